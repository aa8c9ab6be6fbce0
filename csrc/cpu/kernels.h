// Raw-pointer interface between the Tensor glue (csrc/bindings.cpp, built once with default flags)
// and the hot CPU kernels (csrc/cpu/rowsoftmax.cpp, csrc/cpu/feature_centre.cpp), which setup.py
// compiles once per instruction set. Each build puts its functions in the namespace named by the
// CPU_CAPABILITY macro (DEFAULT, AVX2, AVX512), so the three copies link side by side and the glue
// picks one at run time. Nothing here includes ATen's Tensor headers: the kernel TUs stay small and
// share as little inline code with the default build as possible.
#pragma once

#include <cstdint>

namespace kdfast::cpu {

//: element types the kernels accept; arithmetic is fp32 for the first three, fp64 for kFloat64
enum class ElementType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// Codes shared with kdfast/backends/cpu.py and the CUDA kernels.
enum Normalize : int { kNormNone = 0, kNormLayerNorm = 1, kNormL2 = 2, kNormStandardize = 3 };
enum TeacherMode : int { kTeacherNone = 0, kTeacherSoftmax = 1, kTeacherPartial = 2 };

struct RowSoftmaxArgs {
  const void* student = nullptr;   // [rows, classes], contiguous, `type`
  const void* teacher = nullptr;   // same layout, or null when no mode needs it
  const int64_t* target = nullptr; // [rows] or null
  void* grad = nullptr;            // [rows, classes], `type`
  void* loss = nullptr;            // [rows], fp32 (fp64 for kFloat64)
  int64_t rows = 0;
  int64_t classes = 0;
  ElementType type = ElementType::kFloat32;
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
};

struct FeatureCentreArgs {
  const void* student = nullptr;   // u [rows, dim]
  const void* teacher = nullptr;   // f^t [rows, dim] (only its row norms matter)
  const int64_t* target = nullptr; // [rows], already in [0, num_centres)
  const void* centres = nullptr;   // raw class means [num_centres, dim]
  int64_t num_centres = 0;
  void* grad = nullptr;            // [rows, dim]
  void* loss = nullptr;            // [rows], fp32 (fp64 for kFloat64)
  int64_t rows = 0;
  int64_t dim = 0;
  ElementType type = ElementType::kFloat32;
  double eps = 1e-8;
};

// Scratch one call over any row range needs (the caller allocates it once per task): up to five
// row-length buffers for the softmax family (widened student and teacher rows, three exp rows),
// three for ND (widened u, f^t and centre), counted in the widest accumulator type.
constexpr int64_t kRowSoftmaxScratchRows = 5;
constexpr int64_t kFeatureCentreScratchRows = 3;
inline int64_t row_softmax_scratch_bytes(int64_t classes) {
  return kRowSoftmaxScratchRows * classes * static_cast<int64_t>(sizeof(double));
}
inline int64_t feature_centre_scratch_bytes(int64_t dim) {
  return kFeatureCentreScratchRows * dim * static_cast<int64_t>(sizeof(double));
}

// One copy per instruction set. Each processes rows [begin, end) and returns false if a row's
// label is out of range (the glue turns that into an error instead of reading out of bounds).
#define KDFAST_DECLARE_CPU_KERNELS(ISA)                                                              \
  namespace ISA {                                                                                    \
  bool row_softmax_rows(const RowSoftmaxArgs& args, int64_t begin, int64_t end, void* scratch);     \
  bool feature_centre_rows(const FeatureCentreArgs& args, int64_t begin, int64_t end, void* scratch); \
  }
KDFAST_DECLARE_CPU_KERNELS(DEFAULT)
KDFAST_DECLARE_CPU_KERNELS(AVX2)
KDFAST_DECLARE_CPU_KERNELS(AVX512)
#undef KDFAST_DECLARE_CPU_KERNELS

}  // namespace kdfast::cpu
