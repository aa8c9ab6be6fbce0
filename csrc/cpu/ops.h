// Tensor-level CPU implementations registered in csrc/bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace kdfast::cpu {

std::tuple<at::Tensor, at::Tensor> row_softmax(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                               const std::optional<at::Tensor>& target, int64_t normalize,
                                               double multiplier, double eps, double temperature,
                                               int64_t teacher_mode, double kl_weight, double ce_weight,
                                               double uniform_weight, bool reweight, double reweight_alpha,
                                               double reweight_eps, int64_t ignore_index, bool compute_grad,
                                               bool wide_grad, int64_t divergence, double divergence_param);

std::tuple<at::Tensor, at::Tensor> feature_centre(const at::Tensor& student, const at::Tensor& teacher,
                                                  const at::Tensor& target, const at::Tensor& centres, double eps,
                                                  int64_t ignore_index, bool compute_grad, bool wide_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_gram(const at::Tensor& student_features,
                                                             const at::Tensor& teacher_features,
                                                             const at::Tensor& student_landmarks,
                                                             const at::Tensor& teacher_landmarks, int64_t kind,
                                                             double beta, double weight, bool normalize, double eps,
                                                             bool compute_grad, bool wide_grad);

//: the instruction set the row kernels run with: "avx512", "avx2" or "default"
std::string capability();
//: gradient-block reuse (see csrc/cpu/glue.cpp): switch it, returning the previous setting; the bytes
//: of the blocks kept now (in use or idle); drop them
bool set_gradient_reuse(bool enabled);
int64_t kept_gradient_bytes();
void release_kept_gradients();
//: distinct threads one at::parallel_for over many rows runs on (1 means the glue was built without OpenMP)
int64_t parallel_threads_used();

}  // namespace kdfast::cpu
