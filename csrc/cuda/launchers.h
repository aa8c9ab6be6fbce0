// Host launchers of the CUDA kernels: raw device pointers + a stream, no torch types, so the .cu
// files build with plain nvcc and the torch glue (csrc/cuda/glue.cpp) stays a normal C++ TU.
// The argument structs and mode codes are the kernel contract (csrc/common/contract.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/contract.h"

namespace kdfast::cuda {

using kdfast::ElementType;
using kdfast::FeatureCentreArgs;
using kdfast::RowSoftmaxArgs;

// Rows whose label is ignore_index, or out of range, get loss 0 and a zero gradient here; the glue
// asserts on out-of-range labels, so the kernels never read out of bounds whatever they are given.
cudaError_t launch_row_softmax(const RowSoftmaxArgs& args, cudaStream_t stream);
cudaError_t launch_feature_centre(const FeatureCentreArgs& args, cudaStream_t stream);

// In place over the B×m student Gram S^s (fp32, or fp64 when is_double): reads S^t, writes
// G = ∂ℓ/∂R into S^s, the per-row loss sums and the per-row Σ(S^t)². kind: a GramKind.
cudaError_t launch_gram_epilogue(void* student_gram, const void* teacher_gram, void* loss_rows, void* teacher_sq_rows,
                                 int64_t rows, int64_t landmarks, int kind, double beta, bool is_double,
                                 cudaStream_t stream);

}  // namespace kdfast::cuda
