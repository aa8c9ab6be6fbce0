// The kernel contract of kdfast's C++ kernels, in one place for the CPU (csrc/cpu/) and CUDA
// (csrc/cuda/) code: element types, the mode and kind codes, the argument structs of the three
// kernel families and the flags a row-softmax call derives from its arguments. The per-row math
// that uses them is csrc/common/row_math.h.
//
// Plain C++ (no ATen, no CUDA headers), so the per-instruction-set CPU TUs, the nvcc-only .cu
// files and the Tensor glue all include it. The codes are also kdfast/backends/_contract.py's
// tables (a test reads this file and compares them).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define KDFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KDFAST_HOST_DEVICE inline
#endif

namespace kdfast {

//: element types the kernels accept; arithmetic is fp32 for the first three, fp64 for kFloat64
enum class ElementType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

//: row_softmax's `normalize`: h = κ·normalize(z) before the softmax
enum Normalize : int { kNormNone = 0, kNormLayerNorm = 1, kNormL2 = 2, kNormStandardize = 3 };
//: row_softmax's `teacher_mode`: how the target distribution q of the KL term is built
enum TeacherMode : int { kTeacherNone = 0, kTeacherSoftmax = 1, kTeacherPartial = 2 };
//: row_softmax's `divergence`: the form of the KL term of a softmax teacher (row_math.h, divergence_entry)
enum Divergence : int {
  kDivForwardKL = 0,
  kDivReverseKL = 1,
  kDivMixedKL = 2,
  kDivJSD = 3,
  kDivTVD = 4,
  kDivSkewForwardKL = 5,
  kDivSkewReverseKL = 6
};
//: landmark_gram's `kind`: the elementwise loss of the Gram residual
enum GramKind : int { kGramSmoothL1 = 0, kGramSquared = 1 };

struct RowSoftmaxArgs {
  const void* student = nullptr;    // [rows, classes], contiguous, `type`
  const void* teacher = nullptr;    // same layout, or null when no mode needs it
  const int64_t* target = nullptr;  // [rows] or null
  void* grad = nullptr;             // [rows, classes] of `grad_type`, or null: the loss only
  void* loss = nullptr;             // [rows], fp32 (fp64 for kFloat64)
  int64_t rows = 0;
  int64_t classes = 0;
  ElementType type = ElementType::kFloat32;
  ElementType grad_type = ElementType::kFloat32;  // `type`, or the accumulation type (fp32) for half inputs
  int normalize = kNormNone;
  int teacher_mode = kTeacherNone;
  double multiplier = 1.0;
  double eps = 1e-7;
  double temperature = 1.0;
  double kl_weight = 0.0;
  double ce_weight = 0.0;
  double uniform_weight = 0.0;
  bool reweight = false;
  double reweight_alpha = 0.0;
  double reweight_eps = 1e-6;
  int64_t ignore_index = -100;
  int divergence = kDivForwardKL;   // the KL term's form (soft teacher only)
  double divergence_param = 0.0;    // its weight w / β / α, strictly inside (0, 1) where the form has one
};

struct FeatureCentreArgs {
  const void* student = nullptr;    // u [rows, dim]
  const void* teacher = nullptr;    // f^t [rows, dim] (only its row norms matter)
  const int64_t* target = nullptr;  // [rows]: ignore_index, or a class in [0, num_centres)
  const void* centres = nullptr;    // raw class means [num_centres, dim]
  int64_t num_centres = 0;
  void* grad = nullptr;             // [rows, dim] of `grad_type`, or null: the loss only
  void* loss = nullptr;             // [rows], fp32 (fp64 for kFloat64)
  int64_t rows = 0;
  int64_t dim = 0;
  ElementType type = ElementType::kFloat32;
  ElementType grad_type = ElementType::kFloat32;
  double eps = 1e-8;
  int64_t ignore_index = -100;
};

// Calls visit(static_cast<T*>(nullptr)) with T the storage type of `type` in a backend's type table
// (Types::Float32, Float64, BFloat16, Float16: c10's half types on the CPU, CUDA's on the GPU) and
// returns its result; `fallback` for an unknown code.
template <typename Types, typename Result, typename Visitor>
inline Result visit_element_type(ElementType type, Result fallback, Visitor&& visit) {
  switch (type) {
    case ElementType::kFloat32: return visit(static_cast<typename Types::Float32*>(nullptr));
    case ElementType::kFloat64: return visit(static_cast<typename Types::Float64*>(nullptr));
    case ElementType::kBFloat16: return visit(static_cast<typename Types::BFloat16*>(nullptr));
    case ElementType::kFloat16: return visit(static_cast<typename Types::Float16*>(nullptr));
  }
  return fallback;
}

// visit(static_cast<T*>(nullptr), static_cast<G*>(nullptr)) with T the storage type of `type` and G
// that of the gradient: T itself, or fp32 (the accumulation type) for half inputs whose gradient is
// kept wide.
template <typename Types, typename Result, typename Visitor>
inline Result visit_element_and_grad_types(ElementType type, ElementType grad_type, Result fallback,
                                           Visitor&& visit) {
  return visit_element_type<Types>(type, fallback, [&](auto* element) {
    using T = std::remove_pointer_t<decltype(element)>;
    const bool wide = grad_type != type;
    if constexpr (sizeof(T) == 2) {
      if (wide) return visit(element, static_cast<typename Types::Float32*>(nullptr));
    }
    return wide ? fallback : visit(element, element);
  });
}

// Which terms a row-softmax call computes; the same for every row of a call.
struct RowSoftmaxFlags {
  int normalize = kNormNone;
  bool normalised = false;       // normalize ≠ none: the gradient goes through the normalisation's backward
  bool kl = false;               // a KL term (kl_weight ≠ 0 and a teacher mode)
  bool soft_teacher = false;     //   with q = softmax(h^t/T)
  bool partial_teacher = false;  //   with q = KD-pt's target (ρ kept at the label, 1 − ρ spread evenly)
  int divergence = kDivForwardKL;  // the soft teacher's term: a Divergence code (forward KL otherwise)
  bool general_divergence = false;  //   ... other than the forward KL: the per-entry divergence pass
  bool ce = false;               // a CE term
  bool uniform = false;          // a uniform (label-smoothing) term
  bool unit_softmax = false;     // p = softmax(h^s) at T = 1 is needed (CE or uniform term)
  bool share_unit = false;       // ... and it is p_T itself (T = 1 with a KL term): one exp row serves both
  bool reweight = false;         // the CE term is re-weighted by the raw teacher
  bool reads_teacher = false;    // the teacher row is read
  bool uses_label = false;       // the label is read (CE, or KD-pt's target)
};

KDFAST_HOST_DEVICE RowSoftmaxFlags row_softmax_flags(const RowSoftmaxArgs& a) {
  RowSoftmaxFlags f;
  f.normalize = a.normalize;
  f.normalised = a.normalize != kNormNone;
  f.kl = a.kl_weight != 0 && a.teacher_mode != kTeacherNone;
  f.soft_teacher = f.kl && a.teacher_mode == kTeacherSoftmax;
  f.partial_teacher = f.kl && a.teacher_mode == kTeacherPartial;
  f.divergence = f.soft_teacher ? a.divergence : int(kDivForwardKL);
  f.general_divergence = f.divergence != kDivForwardKL;
  f.ce = a.ce_weight != 0;
  f.uniform = a.uniform_weight != 0;
  f.unit_softmax = f.ce || f.uniform;
  f.share_unit = f.unit_softmax && f.kl && a.temperature == 1.0;
  f.reweight = a.reweight && f.ce;
  f.reads_teacher = f.kl || f.reweight;
  f.uses_label = f.ce || f.partial_teacher;
  return f;
}

// What a kernel does with one row, from its label: rows whose label equals ignore_index get loss 0
// and a zero gradient whatever they hold; a label outside [0, classes) on a row that reads it is an
// error (the kernel zeroes the row and reports it, so nothing is ever read out of bounds).
enum class RowAction : int { kCompute = 0, kIgnore = 1, kBadLabel = 2 };

KDFAST_HOST_DEVICE RowAction row_action(int64_t label, bool has_label, int64_t ignore_index, bool reads_label,
                                        int64_t classes) {
  if (has_label && label == ignore_index) return RowAction::kIgnore;
  if (reads_label && (!has_label || label < 0 || label >= classes)) return RowAction::kBadLabel;
  return RowAction::kCompute;
}

}  // namespace kdfast
