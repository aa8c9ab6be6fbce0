// The feature–centre family on CUDA: the ND loss (spec §2a–2c, §6 kernel B), the same per-row math
// as csrc/cpu/feature_centre.cpp: gather the centre, four dot products in one pass, branch, then a
// second pass writes −ê/M + [student branch]·⟨u, ê⟩/(M²‖u‖)·u. A warp per row for small feature
// dimensions, a block per row otherwise; int64 offsets, 16-byte loads when aligned.
#include "common.cuh"
#include "launchers.h"

#include <algorithm>

namespace kdfast::cuda {
namespace {

//: largest feature dimension handled by one warp per row
constexpr int64_t kWarpRowMaxDim = 1024;
constexpr int kWarpsPerBlock = 4;
constexpr int kRowBlockThreads = 256;
constexpr int64_t kMaxGridRows = 65535LL * 32;

template <bool kWarpGroup, typename T>
__device__ void nd_row(const FeatureCentreArgs& a, int64_t row, int lane, int lanes, acc_t_of<T>* shared) {
  using acc_t = acc_t_of<T>;
  const int64_t n = a.dim;
  const T* u = static_cast<const T*>(a.student) + row * n;
  const T* f = static_cast<const T*>(a.teacher) + row * n;
  T* grad = static_cast<T*>(a.grad) + row * n;
  const int64_t y = a.target[row];
  if (y < 0 || y >= a.num_centres) {  // the glue asserts on labels; never read outside the table
    for (int64_t i = lane; i < n; i += lanes) grad[i] = from_acc<T>(acc_t(0));
    if (lane == 0) static_cast<acc_t*>(a.loss)[row] = 0;
    return;
  }
  const T* c = static_cast<const T*>(a.centres) + y * n;
  acc_t dots[3] = {0, 0, 0};  // ⟨u, c⟩, ‖c‖², ‖u‖²
  for_each_pair(u, c, n, lane, lanes, [&](int64_t, acc_t uu, acc_t cc) {
    dots[0] += uu * cc;
    dots[1] += cc * cc;
    dots[2] += uu * uu;
  });
  acc_t teacher_sq[1] = {0};
  for_each_pair(f, static_cast<const T*>(nullptr), n, lane, lanes, [&](int64_t, acc_t v, acc_t) { teacher_sq[0] += v * v; });
  acc_t all[4] = {dots[0], dots[1], dots[2], teacher_sq[0]};
  group_reduce<kWarpGroup, false>(all, shared);
  const acc_t eps = static_cast<acc_t>(a.eps);
  const acc_t centre_norm = fmax(sqrt_acc(all[1]), eps);
  const acc_t u_norm = sqrt_acc(all[2]), teacher_norm = sqrt_acc(all[3]);
  const bool student_branch = u_norm >= teacher_norm;  // a tie takes the cosine branch
  const acc_t raw_scale = student_branch ? u_norm : teacher_norm;
  const acc_t scale = fmax(raw_scale, eps);
  const acc_t cosine_part = all[0] / centre_norm;
  if (lane == 0) static_cast<acc_t*>(a.loss)[row] = 1 - cosine_part / scale;
  const acc_t kc = -1 / (centre_norm * scale);
  const bool through_norm = student_branch && raw_scale >= eps && u_norm > 0;
  const acc_t ku = through_norm ? cosine_part / (scale * scale * u_norm) : acc_t(0);
  for_each_pair(u, c, n, lane, lanes, [&](int64_t i, acc_t uu, acc_t cc) { grad[i] = from_acc<T>(kc * cc + ku * uu); });
}

template <typename T>
__global__ void nd_warp_kernel(FeatureCentreArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < a.rows;
       row += stride) {
    nd_row<true, T>(a, row, lane, kWarpSize, static_cast<acc_t_of<T>*>(nullptr));
  }
}

template <typename T>
__global__ void nd_block_kernel(FeatureCentreArgs a) {
  __shared__ acc_t_of<T> reduction[4 * kMaxWarps];
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    nd_row<false, T>(a, row, threadIdx.x, blockDim.x, reduction);
  }
}

template <typename T>
cudaError_t launch(const FeatureCentreArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (a.dim <= kWarpRowMaxDim) {
    const int64_t blocks = std::min<int64_t>((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridRows);
    nd_warp_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(a);
  } else {
    nd_block_kernel<T><<<static_cast<unsigned>(std::min<int64_t>(a.rows, kMaxGridRows)), kRowBlockThreads, 0,
                         stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_feature_centre(const FeatureCentreArgs& args, cudaStream_t stream) {
  switch (args.type) {
    case ElementType::kFloat32: return launch<float>(args, stream);
    case ElementType::kFloat64: return launch<double>(args, stream);
    case ElementType::kBFloat16: return launch<__nv_bfloat16>(args, stream);
    case ElementType::kFloat16: return launch<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kdfast::cuda
