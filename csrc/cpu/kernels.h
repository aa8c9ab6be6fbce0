// Raw-pointer interface between the Tensor glue (csrc/cpu/glue.cpp, built once with default flags)
// and the hot CPU kernels (csrc/cpu/rowsoftmax.cpp, csrc/cpu/feature_centre.cpp), which setup.py
// compiles once per instruction set. Each build puts its functions in the namespace named by the
// CPU_CAPABILITY macro (DEFAULT, AVX2, AVX512), so the three copies link side by side and the glue
// picks one at run time. Nothing here includes ATen's Tensor headers: the kernel TUs stay small and
// share as little inline code with the default build as possible.
#pragma once

#include <cstdint>

#include "../common/contract.h"

namespace kdfast::cpu {

using kdfast::ElementType;
using kdfast::FeatureCentreArgs;
using kdfast::RowSoftmaxArgs;

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
