// Torch glue of the CUDA kernels: registers them as the CUDA implementations of the
// torch.ops.kdfast operators defined in csrc/bindings.cpp (kdfast._C must be loaded first, which
// kdfast/backends/cuda.py does). Built only against a CUDA build of torch (setup.py); the kernels
// themselves live in the CUDA-only .cu files behind csrc/cuda/launchers.h.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../glue_common.h"
#include "launchers.h"

namespace kdfast::cuda {
namespace {


cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Device-side check of the labels (no host sync); the kernels also skip bad rows, so an invalid
// label is an assertion failure, never an out-of-bounds read.
void assert_labels(const at::Tensor& target, int64_t high, int64_t ignore, const char* message) {
  if (target.numel() == 0) return;
  at::_assert_async(glue::bad_labels(target, 0, high, ignore).any().logical_not(), message);
}

std::tuple<at::Tensor, at::Tensor> row_softmax(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                               const std::optional<at::Tensor>& target, int64_t normalize,
                                               double multiplier, double eps, double temperature,
                                               int64_t teacher_mode, double kl_weight, double ce_weight,
                                               double uniform_weight, bool reweight, double reweight_alpha,
                                               double reweight_eps, int64_t ignore_index, bool compute_grad,
                                               bool wide_grad, int64_t divergence, double divergence_param) {
  constexpr const char* op = "kdfast::row_softmax (cuda)";
  const c10::cuda::CUDAGuard guard(student.device());
  glue::RowSoftmaxCall call = glue::prepare_row_softmax(op, student, teacher, target, normalize, multiplier, eps,
                                                        temperature, teacher_mode, kl_weight, ce_weight,
                                                        uniform_weight, reweight, reweight_alpha, reweight_eps,
                                                        ignore_index, divergence, divergence_param);
  RowSoftmaxArgs& args = call.args;
  if (call.target.defined() && call.flags.uses_label) {
    assert_labels(call.target, args.classes, ignore_index, "kdfast::row_softmax: target outside [0, classes)");
  }
  auto [loss, grad] =
      glue::attach_outputs(args, call.student, glue::empty_gradient_or_none(call.student, compute_grad, wide_grad));
  C10_CUDA_CHECK(launch_row_softmax(args, current_stream()));
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> feature_centre(const at::Tensor& student, const at::Tensor& teacher,
                                                  const at::Tensor& target, const at::Tensor& centres, double eps,
                                                  int64_t ignore_index, bool compute_grad, bool wide_grad) {
  constexpr const char* op = "kdfast::feature_centre (cuda)";
  const c10::cuda::CUDAGuard guard(student.device());
  glue::FeatureCentreCall call = glue::prepare_feature_centre(op, student, teacher, target, centres, eps, ignore_index);
  FeatureCentreArgs& args = call.args;
  assert_labels(call.target, args.num_centres, ignore_index, "kdfast::feature_centre: target outside the centres");
  auto [loss, grad] =
      glue::attach_outputs(args, call.student, glue::empty_gradient_or_none(call.student, compute_grad, wide_grad));
  C10_CUDA_CHECK(launch_feature_centre(args, current_stream()));
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_gram(const at::Tensor& student_features,
                                                             const at::Tensor& teacher_features,
                                                             const at::Tensor& student_landmarks,
                                                             const at::Tensor& teacher_landmarks, int64_t kind,
                                                             double beta, double weight, bool normalize, double eps,
                                                             bool compute_grad, bool wide_grad) {
  constexpr const char* op = "kdfast::landmark_gram (cuda)";
  glue::check_landmark_gram(op, student_features, teacher_features, student_landmarks, teacher_landmarks, kind, beta);
  const c10::cuda::CUDAGuard guard(student_features.device());
  const auto compute = student_features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cs = student_landmarks.to(compute);
  at::Tensor student_gram = at::mm(student_features.to(compute), cs.t()).contiguous();
  const at::Tensor teacher_gram = at::mm(teacher_features.to(compute), teacher_landmarks.to(compute).t()).contiguous();
  const int64_t rows = student_gram.size(0), landmarks = student_gram.size(1);
  at::Tensor loss_rows = at::empty({rows}, student_gram.options());
  at::Tensor teacher_sq_rows = at::empty({rows}, student_gram.options());
  C10_CUDA_CHECK(launch_gram_epilogue(student_gram.data_ptr(), teacher_gram.data_ptr(), loss_rows.data_ptr(),
                                      teacher_sq_rows.data_ptr(), rows, landmarks, static_cast<int>(kind), beta,
                                      compute == at::kDouble, current_stream()));
  const at::Tensor teacher_norm = teacher_sq_rows.sum().sqrt();
  glue::apply_gram_factor(student_gram, loss_rows, teacher_norm, weight, normalize, eps);
  at::Tensor grad = compute_grad
                        ? at::mm(student_gram, cs).to(glue::grad_dtype(student_features, wide_grad))
                        : at::empty({0}, student_features.options());
  return {loss_rows, grad, teacher_norm};
}

}  // namespace
}  // namespace kdfast::cuda

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("row_softmax", &kdfast::cuda::row_softmax);
  m.impl("feature_centre", &kdfast::cuda::feature_centre);
  m.impl("landmark_gram", &kdfast::cuda::landmark_gram);
}

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "kdfast's CUDA kernels (torch.ops.kdfast, CUDA)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
