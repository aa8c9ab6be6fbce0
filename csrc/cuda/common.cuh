// Device helpers shared by the CUDA kernels (CUDA headers only: no torch, so every .cu compiles
// with plain nvcc): element conversions, 16-byte vectorised row iteration, warp and block
// reductions over a "group" (one warp or one whole block per row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/contract.h"

namespace kdfast::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
//: bytes per vectorised load (uint4)
constexpr int kVectorBytes = 16;
//: most warps a block may have (the block reduction keeps one partial per warp in shared memory)
constexpr int kMaxWarps = 32;

//: the storage types of the contract's ElementType codes (visit_element_type)
struct ElementTypes {
  using Float32 = float;
  using Float64 = double;
  using BFloat16 = __nv_bfloat16;
  using Float16 = __half;
};

template <typename T> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename T> using acc_t_of = typename AccumulateType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return v; }

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

template <typename P>
__device__ __forceinline__ bool aligned16(const P* pointer) {
  return (reinterpret_cast<uintptr_t>(pointer) % kVectorBytes) == 0;
}

// f(i, a[i], b[i]) for i in [0, n), spread over `lanes` threads (this one is `lane`), reading 16
// bytes per thread per step when both rows allow it (coalesced either way). b may be null.
template <typename S, typename F>
__device__ __forceinline__ void for_each_pair(const S* a, const S* b, int64_t n, int lane, int lanes, F&& f) {
  constexpr int kPerVector = kVectorBytes / static_cast<int>(sizeof(S));
  int64_t start = 0;
  if (kPerVector > 1 && aligned16(a) && (b == nullptr || aligned16(b))) {
    const int64_t vectors = n / kPerVector;
    for (int64_t v = lane; v < vectors; v += lanes) {
      uint4 raw_a = reinterpret_cast<const uint4*>(a)[v];
      uint4 raw_b = b != nullptr ? reinterpret_cast<const uint4*>(b)[v] : raw_a;
      const S* va = reinterpret_cast<const S*>(&raw_a);
      const S* vb = reinterpret_cast<const S*>(&raw_b);
#pragma unroll
      for (int j = 0; j < kPerVector; ++j) f(v * kPerVector + j, to_acc(va[j]), to_acc(vb[j]));
    }
    start = vectors * kPerVector;
  }
  for (int64_t i = start + lane; i < n; i += lanes) f(i, to_acc(a[i]), b != nullptr ? to_acc(b[i]) : to_acc(a[i]));
}

template <typename acc_t, int N>
__device__ __forceinline__ void warp_sum(acc_t (&v)[N]) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] += __shfl_xor_sync(kFullMask, v[j], offset);
  }
}

template <typename acc_t, int N>
__device__ __forceinline__ void warp_max(acc_t (&v)[N]) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = fmax(v[j], __shfl_xor_sync(kFullMask, v[j], offset));
  }
}

// Sum (or max) of N values over the group; every thread of the group gets the totals.
// For a block group, `shared` holds N·kMaxWarps accumulators.
template <bool kWarpGroup, bool kMax, typename acc_t, int N>
__device__ __forceinline__ void group_reduce(acc_t (&v)[N], acc_t* shared) {
  if constexpr (kMax) warp_max(v); else warp_sum(v);
  if constexpr (!kWarpGroup) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    __syncthreads();  // the previous reduction's readers are done with `shared`
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < N; ++j) shared[j * kMaxWarps + warp] = v[j];
    }
    __syncthreads();
    const acc_t neutral = kMax ? -INFINITY : acc_t(0);
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = lane < warps ? shared[j * kMaxWarps + lane] : neutral;
    if constexpr (kMax) warp_max(v); else warp_sum(v);
  }
}

}  // namespace kdfast::cuda
