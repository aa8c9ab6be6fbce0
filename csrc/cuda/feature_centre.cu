// The feature–centre family on CUDA: the ND loss. Gather the centre, four dot products in one pass,
// csrc/common/row_math.h's feature_centre_terms (the same as the CPU kernel's), then a second pass
// writes kc·c + ku·u. Rows whose label is ignore_index get loss 0 and a zero gradient. A warp per
// row for small feature dimensions, a block per row otherwise; int64 offsets, 16-byte loads when aligned.
#include "common.cuh"
#include "launchers.h"

#include "../common/row_math.h"

#include <algorithm>

namespace kdfast::cuda {
namespace {

//: largest feature dimension handled by one warp per row
constexpr int64_t kWarpRowMaxDim = 1024;
constexpr int kWarpsPerBlock = 4;
constexpr int kRowBlockThreads = 256;
constexpr int64_t kMaxGridRows = 65535LL * 32;

template <bool kWarpGroup, typename T, typename G>
__device__ void nd_row(const FeatureCentreArgs& a, int64_t row, int lane, int lanes, acc_t_of<T>* shared) {
  using acc_t = acc_t_of<T>;
  const int64_t n = a.dim;
  const T* u = static_cast<const T*>(a.student) + row * n;
  const T* f = static_cast<const T*>(a.teacher) + row * n;
  G* grad = a.grad != nullptr ? static_cast<G*>(a.grad) + row * n : nullptr;  // null: the loss only
  const int64_t y = a.target[row];
  if (row_action(y, true, a.ignore_index, true, a.num_centres) != RowAction::kCompute) {
    if (grad != nullptr) {
      for (int64_t i = lane; i < n; i += lanes) grad[i] = from_acc<G>(acc_t(0));
    }
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
  const row_math::CentreTerms<acc_t> terms =
      row_math::feature_centre_terms(all[0], all[1], all[2], all[3], static_cast<acc_t>(a.eps));
  if (lane == 0) static_cast<acc_t*>(a.loss)[row] = terms.loss;
  if (grad == nullptr) return;
  for_each_pair(u, c, n, lane, lanes, [&](int64_t i, acc_t uu, acc_t cc) {
    grad[i] = from_acc<G>(row_math::feature_centre_gradient(terms, cc, uu));
  });
}

template <typename T, typename G>
__global__ void nd_warp_kernel(FeatureCentreArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < a.rows;
       row += stride) {
    nd_row<true, T, G>(a, row, lane, kWarpSize, static_cast<acc_t_of<T>*>(nullptr));
  }
}

template <typename T, typename G>
__global__ void nd_block_kernel(FeatureCentreArgs a) {
  __shared__ acc_t_of<T> reduction[4 * kMaxWarps];
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    nd_row<false, T, G>(a, row, threadIdx.x, blockDim.x, reduction);
  }
}

template <typename T, typename G>
cudaError_t launch(const FeatureCentreArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (a.dim <= kWarpRowMaxDim) {
    const int64_t blocks = std::min<int64_t>((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridRows);
    nd_warp_kernel<T, G><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(a);
  } else {
    nd_block_kernel<T, G><<<static_cast<unsigned>(std::min<int64_t>(a.rows, kMaxGridRows)), kRowBlockThreads, 0,
                         stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_feature_centre(const FeatureCentreArgs& args, cudaStream_t stream) {
  return visit_element_and_grad_types<ElementTypes>(args.type, args.grad_type, cudaErrorInvalidValue,
                                                    [&](auto* type, auto* grad) {
    return launch<std::remove_pointer_t<decltype(type)>, std::remove_pointer_t<decltype(grad)>>(args, stream);
  });
}

}  // namespace kdfast::cuda
