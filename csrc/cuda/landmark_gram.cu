// The landmark-Gram family on CUDA (spec §3a–3c): the GEMMs S^s = F^s·C^sᵀ, S^t = F^t·C^tᵀ and
// G·C^s run through torch (cuBLAS) in csrc/cuda/glue.cpp; this is the fused elementwise epilogue
// between them. One warp per row of the B×m residual: R = S^s − S^t, per-row Σ huber_β(R) or ΣR²,
// per-row Σ(S^t)² (for ‖S^t‖_F), and G = ∂ℓ/∂R written in place of S^s (csrc/common/row_math.h's
// gram_entry, as on the CPU).
#include "common.cuh"
#include "launchers.h"

#include "../common/row_math.h"

#include <algorithm>

namespace kdfast::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxGridRows = 65535LL * 32;

template <typename acc_t>
__global__ void gram_epilogue_kernel(acc_t* student_gram, const acc_t* teacher_gram, acc_t* loss_rows,
                                     acc_t* teacher_sq_rows, int64_t rows, int64_t landmarks, int kind, acc_t beta) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < rows;
       row += stride) {
    acc_t* s = student_gram + row * landmarks;
    const acc_t* t = teacher_gram + row * landmarks;
    acc_t sums[2] = {0, 0};  // loss, Σ(S^t)²
    for (int64_t j = lane; j < landmarks; j += kWarpSize) {
      const row_math::GramEntry<acc_t> entry = row_math::gram_entry(kind, s[j] - t[j], beta);
      sums[0] += entry.loss;
      sums[1] += t[j] * t[j];
      s[j] = entry.grad;
    }
    warp_sum(sums);
    if (lane == 0) {
      loss_rows[row] = sums[0];
      teacher_sq_rows[row] = sums[1];
    }
  }
}

template <typename acc_t>
cudaError_t launch(void* student_gram, const void* teacher_gram, void* loss_rows, void* teacher_sq_rows, int64_t rows,
                   int64_t landmarks, int kind, double beta, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridRows);
  gram_epilogue_kernel<acc_t><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<acc_t*>(student_gram), static_cast<const acc_t*>(teacher_gram), static_cast<acc_t*>(loss_rows),
      static_cast<acc_t*>(teacher_sq_rows), rows, landmarks, kind, static_cast<acc_t>(beta));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gram_epilogue(void* student_gram, const void* teacher_gram, void* loss_rows, void* teacher_sq_rows,
                                 int64_t rows, int64_t landmarks, int kind, double beta, bool is_double,
                                 cudaStream_t stream) {
  return is_double ? launch<double>(student_gram, teacher_gram, loss_rows, teacher_sq_rows, rows, landmarks, kind,
                                    beta, stream)
                   : launch<float>(student_gram, teacher_gram, loss_rows, teacher_sq_rows, rows, landmarks, kind,
                                   beta, stream);
}

}  // namespace kdfast::cuda
