// Tensor-side pieces the CPU and CUDA glue (csrc/cpu/glue.cpp, csrc/cuda/glue.cpp) share: the
// element-type code of a tensor, the dtype of the per-row losses, the label tensor's check,
// landmark_gram's contract factor, and the whole row-softmax prologue (options, which inputs a mode reads, contiguous inputs and their
// pointers). Header-only (ATen + the raw kernel interface), so both extensions compile it into
// their own glue.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cpu/kernels.h"

namespace kdfast::glue {

using cpu::ElementType;
using cpu::RowSoftmaxArgs;

inline ElementType element_type(const at::Tensor& tensor, const char* op) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kDouble: return ElementType::kFloat64;
    case at::kBFloat16: return ElementType::kBFloat16;
    case at::kHalf: return ElementType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": expected a float32, float64, bfloat16 or float16 tensor, got ", tensor.scalar_type());
  }
}

//: per-row losses are fp32, or fp64 for fp64 inputs
inline at::ScalarType loss_type(const at::Tensor& tensor) {
  return tensor.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

//: the labels as contiguous int64 [rows], or an error naming the op (their range is the caller's check)
inline at::Tensor checked_target(const at::Tensor& target, int64_t rows, const char* op) {
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == rows, op,
              ": target must be int64 of shape [", rows, "], got ", target.scalar_type(), " ", target.sizes());
  return target.contiguous();
}

// landmark_gram's contract factor, applied to the loss rows and to G = ∂ℓ/∂R (B×m) before the last
// GEMM rather than to the B×d gradient after it: × weight, ÷ (‖S^t‖_F + eps) when normalising. The
// norm stays a tensor, so no device sync.
inline void apply_gram_factor(at::Tensor& gram_grad, at::Tensor& loss_rows, const at::Tensor& teacher_norm,
                              double weight, bool normalize, double eps) {
  if (normalize) {
    const at::Tensor factor = at::reciprocal(teacher_norm + eps).mul_(weight);
    gram_grad.mul_(factor);
    loss_rows.mul_(factor);
  } else if (weight != 1.0) {
    gram_grad.mul_(weight);
    loss_rows.mul_(weight);
  }
}

//: which optional inputs a row-softmax mode reads
struct RowSoftmaxInputs {
  bool teacher = false;  // a KL term, or the re-weighted CE (its weight comes from the teacher)
  bool label = false;    // a CE term, or KD-pt (its target distribution keeps the true class)
};

inline RowSoftmaxInputs row_softmax_inputs(int64_t teacher_mode, double kl_weight, double ce_weight, bool reweight) {
  const bool kl = kl_weight != 0 && teacher_mode != cpu::kTeacherNone;
  return {kl || (reweight && ce_weight != 0), ce_weight != 0 || (kl && teacher_mode == cpu::kTeacherPartial)};
}

// Validates the mode codes and scalars of torch.ops.kdfast.row_softmax and stores them in args
// (the tensor pointers are the caller's business).
inline void set_row_softmax_options(RowSoftmaxArgs& args, const char* op, int64_t rows, int64_t classes,
                                    int64_t normalize, double multiplier, double eps, double temperature,
                                    int64_t teacher_mode, double kl_weight, double ce_weight, double uniform_weight,
                                    bool reweight, double reweight_alpha, double reweight_eps,
                                    int64_t ignore_index) {
  TORCH_CHECK(normalize >= cpu::kNormNone && normalize <= cpu::kNormStandardize, op, ": unknown normalize code ",
              normalize);
  TORCH_CHECK(teacher_mode >= cpu::kTeacherNone && teacher_mode <= cpu::kTeacherPartial, op,
              ": unknown teacher code ", teacher_mode);
  TORCH_CHECK(temperature > 0 && multiplier > 0 && eps > 0, op, ": temperature, multiplier and eps must be > 0");
  args.rows = rows;
  args.classes = classes;
  args.normalize = static_cast<int>(normalize);
  args.teacher_mode = static_cast<int>(teacher_mode);
  args.multiplier = multiplier;
  args.eps = eps;
  args.temperature = temperature;
  args.kl_weight = kl_weight;
  args.ce_weight = ce_weight;
  args.uniform_weight = uniform_weight;
  args.reweight = reweight;
  args.reweight_alpha = reweight_alpha;
  args.reweight_eps = reweight_eps;
  args.ignore_index = ignore_index;
}

// One row-softmax launch: the options in args, the tensors it reads made contiguous (teacher in the
// student's dtype) and their pointers in args. Outputs and the label range check are the caller's.
struct RowSoftmaxCall {
  RowSoftmaxArgs args;
  RowSoftmaxInputs needs;
  at::Tensor student, teacher, target;  // kept alive for the launch
};

inline RowSoftmaxCall prepare_row_softmax(const char* op, const at::Tensor& student,
                                          const std::optional<at::Tensor>& teacher,
                                          const std::optional<at::Tensor>& target, int64_t normalize,
                                          double multiplier, double eps, double temperature, int64_t teacher_mode,
                                          double kl_weight, double ce_weight, double uniform_weight, bool reweight,
                                          double reweight_alpha, double reweight_eps, int64_t ignore_index) {
  TORCH_CHECK(student.dim() == 2 && student.size(1) > 0, op, ": student must be [rows, classes>0], got ",
              student.sizes());
  const int64_t rows = student.size(0), classes = student.size(1);
  RowSoftmaxCall call;
  set_row_softmax_options(call.args, op, rows, classes, normalize, multiplier, eps, temperature, teacher_mode,
                          kl_weight, ce_weight, uniform_weight, reweight, reweight_alpha, reweight_eps, ignore_index);
  call.args.type = element_type(student, op);
  call.student = student.contiguous();
  call.args.student = call.student.data_ptr();
  call.needs = row_softmax_inputs(teacher_mode, kl_weight, ce_weight, reweight);
  if (call.needs.teacher) {
    TORCH_CHECK(teacher.has_value(), op, ": this mode needs teacher logits");
    TORCH_CHECK(teacher->sizes() == student.sizes(), op, ": teacher shape ", teacher->sizes(),
                " differs from student shape ", student.sizes());
    call.teacher = teacher->to(student.scalar_type()).contiguous();
    call.args.teacher = call.teacher.data_ptr();
  }
  if (target.has_value()) {
    call.target = checked_target(*target, rows, op);
    call.args.target = call.target.data_ptr<int64_t>();
  }
  TORCH_CHECK(!call.needs.label || target.has_value(), op, ": this mode needs a target");
  return call;
}

}  // namespace kdfast::glue
