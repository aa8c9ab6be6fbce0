// Tensor-side pieces the CPU and CUDA glue (csrc/cpu/glue.cpp, csrc/cuda/glue.cpp) share: the
// element-type code of a tensor, the dtype of the per-row losses, the label tensor's check,
// landmark_gram's checks and contract factor, and the whole row-softmax and feature-centre
// prologues (options, which inputs a mode reads, contiguous inputs and their pointers).
// Header-only (ATen + the kernel contract), so both extensions compile it into their own glue.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/contract.h"

namespace kdfast::glue {

using kdfast::ElementType;
using kdfast::FeatureCentreArgs;
using kdfast::RowSoftmaxArgs;

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

// landmark_gram's argument checks (shapes, kind, beta), naming the op
inline void check_landmark_gram(const char* op, const at::Tensor& student_features, const at::Tensor& teacher_features,
                                const at::Tensor& student_landmarks, const at::Tensor& teacher_landmarks, int64_t kind,
                                double beta) {
  TORCH_CHECK(student_features.dim() == 2 && teacher_features.dim() == 2 && student_landmarks.dim() == 2 &&
                  teacher_landmarks.dim() == 2,
              op, " expects 2-D features and landmarks");
  TORCH_CHECK(kind == kGramSmoothL1 || kind == kGramSquared, op, ": unknown kind ", kind);
  TORCH_CHECK(beta > 0 || kind != kGramSmoothL1, op, ": beta must be positive");
  TORCH_CHECK(teacher_features.size(0) == student_features.size(0) &&
                  teacher_landmarks.size(0) == student_landmarks.size(0) &&
                  student_landmarks.size(1) == student_features.size(1) &&
                  teacher_landmarks.size(1) == teacher_features.size(1),
              op, ": shapes do not match: F^s ", student_features.sizes(), ", F^t ", teacher_features.sizes(),
              ", C^s ", student_landmarks.sizes(), ", C^t ", teacher_landmarks.sizes());
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

// Validates the mode codes and scalars of torch.ops.kdfast.row_softmax and stores them in args
// (the tensor pointers are the caller's business).
inline void set_row_softmax_options(RowSoftmaxArgs& args, const char* op, int64_t rows, int64_t classes,
                                    int64_t normalize, double multiplier, double eps, double temperature,
                                    int64_t teacher_mode, double kl_weight, double ce_weight, double uniform_weight,
                                    bool reweight, double reweight_alpha, double reweight_eps,
                                    int64_t ignore_index, int64_t divergence, double divergence_param) {
  TORCH_CHECK(normalize >= kNormNone && normalize <= kNormStandardize, op, ": unknown normalize code ", normalize);
  TORCH_CHECK(teacher_mode >= kTeacherNone && teacher_mode <= kTeacherPartial, op,
              ": unknown teacher code ", teacher_mode);
  TORCH_CHECK(temperature > 0 && multiplier > 0 && eps > 0, op, ": temperature, multiplier and eps must be > 0");
  TORCH_CHECK(divergence >= kDivForwardKL && divergence <= kDivSkewReverseKL, op, ": unknown divergence code ",
              divergence, " (expected ", int(kDivForwardKL), "..", int(kDivSkewReverseKL), ")");
  const bool weighted_form = divergence == kDivMixedKL || divergence == kDivJSD || divergence == kDivSkewForwardKL ||
                             divergence == kDivSkewReverseKL;
  // the mixtures take log w and log(1 − w); the endpoints are the plain KLs and must be passed as those
  TORCH_CHECK(!weighted_form || (divergence_param > 0 && divergence_param < 1), op,
              ": divergence_param must lie strictly inside (0, 1) for divergence code ", divergence, ", got ",
              divergence_param);
  TORCH_CHECK(divergence == kDivForwardKL || teacher_mode == kTeacherSoftmax, op, ": divergence code ", divergence,
              " needs the softmax teacher (teacher_mode ", int(kTeacherSoftmax), "), got teacher_mode ", teacher_mode);
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
  args.divergence = static_cast<int>(divergence);
  args.divergence_param = divergence_param;
}

// One row-softmax launch: the options in args, the tensors it reads made contiguous (teacher in the
// student's dtype) and their pointers in args. Outputs and the label range check are the caller's.
struct RowSoftmaxCall {
  RowSoftmaxArgs args;
  RowSoftmaxFlags flags;
  at::Tensor student, teacher, target;  // kept alive for the launch
};

inline RowSoftmaxCall prepare_row_softmax(const char* op, const at::Tensor& student,
                                          const std::optional<at::Tensor>& teacher,
                                          const std::optional<at::Tensor>& target, int64_t normalize,
                                          double multiplier, double eps, double temperature, int64_t teacher_mode,
                                          double kl_weight, double ce_weight, double uniform_weight, bool reweight,
                                          double reweight_alpha, double reweight_eps, int64_t ignore_index,
                                          int64_t divergence, double divergence_param) {
  TORCH_CHECK(student.dim() == 2 && student.size(1) > 0, op, ": student must be [rows, classes>0], got ",
              student.sizes());
  const int64_t rows = student.size(0), classes = student.size(1);
  RowSoftmaxCall call;
  set_row_softmax_options(call.args, op, rows, classes, normalize, multiplier, eps, temperature, teacher_mode,
                          kl_weight, ce_weight, uniform_weight, reweight, reweight_alpha, reweight_eps, ignore_index,
                          divergence, divergence_param);
  call.args.type = element_type(student, op);
  call.student = student.contiguous();
  call.args.student = call.student.data_ptr();
  call.flags = row_softmax_flags(call.args);
  if (call.flags.reads_teacher) {
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
  TORCH_CHECK(!call.flags.uses_label || target.has_value(), op, ": this mode needs a target");
  return call;
}

// One feature-centre launch: checked, contiguous inputs (teacher and centres in the student's dtype)
// and their pointers in args. Outputs and the label range check are the caller's.
struct FeatureCentreCall {
  FeatureCentreArgs args;
  at::Tensor student, teacher, target, centres;  // kept alive for the launch
};

inline FeatureCentreCall prepare_feature_centre(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                                const at::Tensor& target, const at::Tensor& centres, double eps,
                                                int64_t ignore_index) {
  TORCH_CHECK(student.dim() == 2, op, ": student features must be 2-D, got ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), op, ": teacher features ", teacher.sizes(),
              " must match student features ", student.sizes());
  TORCH_CHECK(centres.dim() == 2 && centres.size(1) == student.size(1), op, ": centres must be [classes, ",
              student.size(1), "], got ", centres.sizes());
  TORCH_CHECK(eps > 0, op, ": eps must be > 0");
  FeatureCentreCall call;
  FeatureCentreArgs& args = call.args;
  args.type = element_type(student, op);
  call.student = student.contiguous();
  call.teacher = teacher.to(student.scalar_type()).contiguous();
  call.centres = centres.to(student.scalar_type()).contiguous();
  call.target = checked_target(target, student.size(0), op);
  args.student = call.student.data_ptr();
  args.teacher = call.teacher.data_ptr();
  args.target = call.target.data_ptr<int64_t>();
  args.centres = call.centres.data_ptr();
  args.num_centres = call.centres.size(0);
  args.rows = student.size(0);
  args.dim = student.size(1);
  args.eps = eps;
  args.ignore_index = ignore_index;
  return call;
}

//: the gradient's dtype: the input's, or fp32 for half inputs when `wide` (so that an upstream
//: factor, e.g. a loss scale, is applied before the gradient's one rounding to the input dtype)
inline at::ScalarType grad_dtype(const at::Tensor& input, bool wide) {
  const bool half = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  return wide && half ? at::kFloat : input.scalar_type();
}

//: a contiguous gradient for `input` (see grad_dtype), or an undefined tensor when none is wanted
inline at::Tensor empty_gradient_or_none(const at::Tensor& input, bool compute_grad, bool wide) {
  return compute_grad ? at::empty(input.sizes(), input.options().dtype(grad_dtype(input, wide))) : at::Tensor();
}

// The outputs of a row kernel: the per-row losses and the gradient (allocated by the caller,
// contiguous, of grad_dtype), both attached to args. Without a gradient (an undefined `grad`: the
// loss only, e.g. under no_grad) the kernel skips every gradient pass and an empty tensor is returned.
template <typename Args>
inline std::tuple<at::Tensor, at::Tensor> attach_outputs(Args& args, const at::Tensor& like, at::Tensor grad) {
  at::Tensor loss = at::empty({args.rows}, like.options().dtype(loss_type(like)));
  args.loss = loss.data_ptr();
  args.grad_type = args.type;
  args.grad = nullptr;
  if (grad.defined()) {
    args.grad = grad.data_ptr();
    args.grad_type = element_type(grad, "gradient");
  } else {
    grad = at::empty({0}, like.options());
  }
  return {loss, grad};
}

//: the labels a kernel will gather with: not ignore_index and outside [low, high)
inline at::Tensor bad_labels(const at::Tensor& target, int64_t low, int64_t high, std::optional<int64_t> ignore) {
  at::Tensor bad = (target < low) | (target >= high);
  if (ignore.has_value()) bad = bad & (target != *ignore);
  return bad;
}

}  // namespace kdfast::glue
