// The row-softmax family on CUDA: the per-row math is csrc/common/row_math.h (the same functions
// as the CPU kernels): statistics → exp sums (→ divergence sums) → loss and gradient coefficients
// → gradient (→ normalisation backward). Exps are recomputed in the gradient pass rather than stored: on a
// GPU the passes are bound by memory, not by exp.
//
// Three launch shapes, chosen by the number of classes C (see launch_row_softmax):
//   * warp per row, C ≤ kWarpRowMaxClasses: a row is a few KB, re-read from L1/L2;
//   * block per row with the widened student and teacher rows staged once in shared memory, while
//     they fit (up to ~20k classes on A100/H100);
//   * block per row streamed: every pass re-reads the row from global memory (L2-resident for
//     moderate C), for any larger C.
// All row offsets are int64; loads are 16 bytes per thread when the rows are 16-byte aligned.
#include "common.cuh"
#include "launchers.h"

#include "../common/row_math.h"

#include <algorithm>

namespace kdfast::cuda {
namespace {

namespace math = kdfast::row_math;

//: largest C handled by one warp per row
constexpr int64_t kWarpRowMaxClasses = 1024;
//: rows per block in the warp-per-row shape
constexpr int kWarpsPerBlock = 4;
//: threads per block in the block-per-row shapes
constexpr int kRowBlockThreads = 512;
//: grid cap; larger batches loop over rows (grid-stride)
constexpr int64_t kMaxGridRows = 65535LL * 32;

// What every row of a call shares: the flags and scalars of the contract.
template <typename acc_t>
struct Params {
  int64_t n;
  int64_t ignore_index;
  RowSoftmaxFlags flags;
  math::RowSoftmaxScalars<acc_t> scalars;
  math::DivergenceWeights<acc_t> divergence;  // a general divergence's weights (row_math.h)
};

template <typename acc_t>
Params<acc_t> make_params(const RowSoftmaxArgs& a) {
  const RowSoftmaxFlags flags = row_softmax_flags(a);
  return {a.classes, a.ignore_index, flags, math::row_softmax_scalars<acc_t>(a),
          math::divergence_weights<acc_t>(flags.divergence, a.divergence_param)};
}

// A row's raw max and sum and its normalisation map.
template <typename acc_t>
struct RowStatistics {
  acc_t max, sum;
  math::NormalisationMap<acc_t> map;
};

// Statistics of the student row and, when given, the teacher row (same normalisation).
template <bool kWarpGroup, typename S, typename acc_t>
__device__ void row_statistics(const S* zs, const S* zt, const Params<acc_t>& p, int lane, int lanes, acc_t* shared,
                               RowStatistics<acc_t>& s, RowStatistics<acc_t>& t) {
  const int normalize = p.flags.normalize;
  acc_t maxes[2] = {-INFINITY, -INFINITY};
  acc_t sums[4] = {0, 0, 0, 0};  // Σzs, Σzt, Σzs², Σzt²
  for_each_pair(zs, zt, p.n, lane, lanes, [&](int64_t, acc_t a, acc_t b) {
    maxes[0] = fmax(maxes[0], a);
    maxes[1] = fmax(maxes[1], b);
    sums[0] += a;
    sums[1] += b;
    sums[2] += a * a;
    sums[3] += b * b;
  });
  group_reduce<kWarpGroup, true>(maxes, shared);
  group_reduce<kWarpGroup, false>(sums, shared);
  acc_t centred[2] = {0, 0};
  if (math::needs_centred_squares(normalize)) {
    const acc_t ms = math::row_mean(normalize, sums[0], p.n), mt = math::row_mean(normalize, sums[1], p.n);
    for_each_pair(zs, zt, p.n, lane, lanes, [&](int64_t, acc_t a, acc_t b) {
      centred[0] += (a - ms) * (a - ms);
      centred[1] += (b - mt) * (b - mt);
    });
    group_reduce<kWarpGroup, false>(centred, shared);
  }
  const acc_t kappa = p.scalars.kappa, eps = p.scalars.eps;
  s = {maxes[0], sums[0], math::normalisation_map(normalize, p.n, sums[0], sums[2], centred[0], kappa, eps)};
  t = {maxes[1], sums[1], math::normalisation_map(normalize, p.n, sums[1], sums[3], centred[1], kappa, eps)};
}

// Loss and gradient of one row: `zs`, `zt` are its student and teacher rows (global memory of type
// T, or shared memory already widened to acc_t); `grad_row` is global. Every thread of the group
// calls this with the same row; the exps are recomputed in each pass rather than stored.
// kGeneral: the call's soft teacher has a divergence other than the forward KL (flags.general_divergence).
// A compile-time mode, so the other modes' kernels (the classic KD's among them) are the code and
// register counts they were without it: its per-entry math inlined into every unrolled step would
// otherwise raise them.
template <bool kWarpGroup, bool kGeneral, typename S, typename T, typename acc_t>
__device__ void process_row(const S* zs, const S* zt, int64_t y, const Params<acc_t>& p, T* grad_row, acc_t* loss_out,
                            int lane, int lanes, acc_t* shared) {
  const int64_t n = p.n;
  // the flags with what kGeneral fixes made compile-time constants (row_coefficients sees them too)
  RowSoftmaxFlags f = p.flags;
  f.general_divergence = kGeneral;
  if constexpr (kGeneral) {
    f.kl = f.soft_teacher = true;
    f.partial_teacher = false;
  }
  const bool soft_teacher = f.soft_teacher, partial_teacher = f.partial_teacher;
  RowStatistics<acc_t> s, t;
  row_statistics<kWarpGroup>(zs, f.reads_teacher ? zt : nullptr, p, lane, lanes, shared, s, t);
  const acc_t inv_t = 1 / p.scalars.temperature;
  const acc_t scale_t = s.map.scale * inv_t;          // p_T's log-argument per unit of z − max
  const acc_t teacher_scale_t = t.map.scale * inv_t;  // q's (soft teacher)
  const bool separate_unit = f.unit_softmax && !f.share_unit;

  math::RowSums<acc_t> sums;
  sums.student_max = s.max;
  sums.student_sum = s.sum;
  sums.raw_teacher_max = t.max;
  if (f.uses_label) {  // read once by every thread (broadcast through the cache)
    sums.student_label = to_acc(zs[y]);
    if (f.reads_teacher) sums.teacher_label = to_acc(zt[y]);
  }
  if (partial_teacher) {
    acc_t rest_max[1] = {-INFINITY};
    for_each_pair(zt, static_cast<const S*>(nullptr), n, lane, lanes, [&](int64_t i, acc_t b, acc_t) {
      if (i != y) rest_max[0] = fmax(rest_max[0], b);
    });
    group_reduce<kWarpGroup, true>(rest_max, shared);
    sums.rest_max = rest_max[0];
  }
  const acc_t rest_shift = math::exp_shift(sums.rest_max);

  // [0] Zs, [1] Zt, [2] W, [3] Z1, [4] Σ_{c≠y} teacher exps, [5] raw teacher exps
  acc_t exps[6] = {0, 0, 0, 0, 0, 0};
  for_each_pair(zs, f.reads_teacher ? zt : nullptr, n, lane, lanes, [&](int64_t i, acc_t a, acc_t b) {
    const acc_t ls = (a - s.max) * scale_t;
    if (f.kl) exps[0] += exp_acc(ls);
    if (soft_teacher) {
      const acc_t lt = (b - t.max) * teacher_scale_t;
      const acc_t et = exp_acc(lt);
      exps[1] += et;
      if constexpr (!kGeneral) exps[2] += math::kl_entry(et, lt - ls);
    }
    if (separate_unit) exps[3] += exp_acc((a - s.max) * s.map.scale);
    if (partial_teacher && i != y) exps[4] += exp_acc((b - rest_shift) * inv_t);
    if (f.reweight) exps[5] += exp_acc((b - t.max) * inv_t);
  });
  group_reduce<kWarpGroup, false>(exps, shared);
  sums.student_exp = exps[0];
  sums.teacher_exp = exps[1];
  sums.kl_weighted = exps[2] / exps[1];
  sums.unit_exp = exps[3];
  sums.rest_exp = exps[4];
  sums.raw_teacher_exp = exps[5];

  // A divergence other than the forward KL: d_j and π_j from p = es/Zs, q = et/Zt and their logs
  // (taken from the log-arguments, so an underflowed p keeps its finite log); one more pass for
  // Σd and Σπ, and π recomputed in the gradient pass, where it takes the teacher exp's place.
  const acc_t inv_zs = 1 / sums.student_exp, inv_zt = 1 / sums.teacher_exp;
  const acc_t log_zs = kGeneral ? log_acc(sums.student_exp) : acc_t(0);
  const acc_t log_zt = kGeneral ? log_acc(sums.teacher_exp) : acc_t(0);
  auto divergence = [&](acc_t a, acc_t b) {
    const acc_t ls = (a - s.max) * scale_t, lt = (b - t.max) * teacher_scale_t;
    return math::divergence_entry(f.divergence, p.divergence, exp_acc(ls) * inv_zs, exp_acc(lt) * inv_zt,
                                  ls - log_zs, lt - log_zt);
  };
  if constexpr (kGeneral) {
    acc_t terms[2] = {0, 0};  // Σd, Σπ
    for_each_pair(zs, zt, n, lane, lanes, [&](int64_t, acc_t a, acc_t b) {
      const math::DivergenceEntry<acc_t> e = divergence(a, b);
      terms[0] += e.d;
      terms[1] += e.pi;
    });
    group_reduce<kWarpGroup, false>(terms, shared);
    sums.divergence = terms[0];
    sums.divergence_pi = terms[1];
  }
  const math::RowCoefficients<acc_t> c = math::row_coefficients(f, p.scalars, s.map, n, sums);
  if (lane == 0) *loss_out = c.loss;
  if (grad_row == nullptr) return;  // the loss only

  auto gradient = [&](int64_t i, acc_t a, acc_t b) {
    const acc_t es = f.kl ? exp_acc((a - s.max) * scale_t) : acc_t(0);
    acc_t et = 0;
    if constexpr (kGeneral) {
      et = divergence(a, b).pi;
    } else if (f.soft_teacher) {
      et = exp_acc((b - t.max) * teacher_scale_t);
    }
    const acc_t e1 = separate_unit ? exp_acc((a - s.max) * s.map.scale) : acc_t(0);
    const acc_t g = math::logit_gradient<true, true, true>(c, es, et, e1);
    return i == y ? g + c.at_label : g;
  };
  const S* teacher_for_grad = soft_teacher ? zt : nullptr;
  if (!f.normalised) {
    for_each_pair(zs, teacher_for_grad, n, lane, lanes,
                  [&](int64_t i, acc_t a, acc_t b) { grad_row[i] = from_acc<T>(gradient(i, a, b)); });
    return;
  }
  acc_t g_sums[2] = {0, 0};  // Σg, Σg·(z − μ)
  for_each_pair(zs, teacher_for_grad, n, lane, lanes, [&](int64_t i, acc_t a, acc_t b) {
    const acc_t g = gradient(i, a, b);
    g_sums[0] += g;
    g_sums[1] += g * (a - s.map.mean);
  });
  group_reduce<kWarpGroup, false>(g_sums, shared);
  const math::NormalisationBackward<acc_t> back = math::normalisation_backward(s.map, g_sums[0], g_sums[1], n);
  for_each_pair(zs, teacher_for_grad, n, lane, lanes, [&](int64_t i, acc_t a, acc_t b) {
    grad_row[i] = from_acc<T>(math::normalised_gradient(gradient(i, a, b), a, back));
  });
}

// Rows the contract does not compute (row_action) get loss 0 and a zero gradient here; returns
// whether `row` was one of them, else its label in y.
template <typename T, typename G>
__device__ __forceinline__ bool skipped_row(const RowSoftmaxArgs& a, const Params<acc_t_of<T>>& p, int64_t row,
                                            int lane, int lanes, int64_t& y) {
  y = a.target != nullptr ? a.target[row] : -1;
  if (row_action(y, a.target != nullptr, p.ignore_index, p.flags.uses_label, p.n) == RowAction::kCompute) return false;
  if (a.grad != nullptr) {
    G* grad_row = static_cast<G*>(a.grad) + row * p.n;
    for (int64_t i = lane; i < p.n; i += lanes) grad_row[i] = from_acc<G>(acc_t_of<T>(0));
  }
  if (lane == 0) static_cast<acc_t_of<T>*>(a.loss)[row] = 0;
  return true;
}

// One warp per row (T: input, G: gradient element type; kGeneral as process_row's).
template <typename T, typename G, bool kGeneral>
__global__ void warp_rows_kernel(RowSoftmaxArgs a, Params<acc_t_of<T>> p) {
  using acc_t = acc_t_of<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const T* student = static_cast<const T*>(a.student);
  const T* teacher = static_cast<const T*>(a.teacher);
  G* grad = static_cast<G*>(a.grad);
  acc_t* loss = static_cast<acc_t*>(a.loss);
  for (int64_t row = first; row < a.rows; row += stride) {
    const int64_t offset = row * p.n;
    int64_t y;
    if (skipped_row<T, G>(a, p, row, lane, kWarpSize, y)) continue;
    process_row<true, kGeneral>(student + offset, teacher != nullptr ? teacher + offset : nullptr, y, p,
                      grad != nullptr ? grad + offset : nullptr,
                      loss + row, lane, kWarpSize, static_cast<acc_t*>(nullptr));
  }
}

// One block per row; kStage: widen the rows into shared memory once, then every pass reads there.
template <typename T, typename G, bool kStage, bool kGeneral>
__global__ void block_rows_kernel(RowSoftmaxArgs a, Params<acc_t_of<T>> p) {
  using acc_t = acc_t_of<T>;
  extern __shared__ unsigned char dynamic_shared[];
  __shared__ acc_t reduction[8 * kMaxWarps];
  acc_t* staged = reinterpret_cast<acc_t*>(dynamic_shared);
  const T* student = static_cast<const T*>(a.student);
  const T* teacher = static_cast<const T*>(a.teacher);
  G* grad = static_cast<G*>(a.grad);
  acc_t* loss = static_cast<acc_t*>(a.loss);
  const int lane = threadIdx.x, lanes = blockDim.x;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t offset = row * p.n;
    G* grad_row = grad != nullptr ? grad + offset : nullptr;
    int64_t y;
    if (skipped_row<T, G>(a, p, row, lane, lanes, y)) continue;
    const T* zt = teacher != nullptr ? teacher + offset : nullptr;
    if constexpr (kStage) {
      acc_t* zs_shared = staged;
      acc_t* zt_shared = zt != nullptr ? staged + p.n : nullptr;
      __syncthreads();  // the previous row's readers are done
      for_each_pair(student + offset, zt, p.n, lane, lanes, [&](int64_t i, acc_t s, acc_t t) {
        zs_shared[i] = s;
        if (zt_shared != nullptr) zt_shared[i] = t;
      });
      __syncthreads();
      process_row<false, kGeneral>(static_cast<const acc_t*>(zs_shared), static_cast<const acc_t*>(zt_shared), y, p,
                         grad_row, loss + row, lane, lanes, reduction);
    } else {
      process_row<false, kGeneral>(student + offset, zt, y, p, grad_row, loss + row, lane, lanes, reduction);
    }
  }
}

// Threads per block of a block-per-row kernel: kRowBlockThreads, or fewer whole warps where its
// registers per thread would not let that many share an SM and the launch would fail (fp64 rows
// with a general divergence, on some architectures). The reductions work for any whole warps.
template <typename Kernel>
cudaError_t block_threads(Kernel kernel, int& threads) {
  cudaFuncAttributes attributes{};
  const cudaError_t error = cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel));
  threads = std::min(kRowBlockThreads, attributes.maxThreadsPerBlock / kWarpSize * kWarpSize);
  return error;
}

template <typename T, typename G, bool kGeneral>
cudaError_t launch_mode(const RowSoftmaxArgs& a, const Params<acc_t_of<T>>& p, cudaStream_t stream) {
  using acc_t = acc_t_of<T>;
  if (a.classes <= kWarpRowMaxClasses) {
    const int64_t blocks = std::min<int64_t>((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridRows);
    warp_rows_kernel<T, G, kGeneral><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(a, p);
    return cudaGetLastError();
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(a.rows, kMaxGridRows));
  const int64_t staged_rows = a.teacher != nullptr ? 2 : 1;  // the glue passes a teacher only when one is read
  const int64_t staged_bytes = staged_rows * a.classes * static_cast<int64_t>(sizeof(acc_t));
  int device = 0, optin = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error != cudaSuccess) return error;
  // leave room for the static reduction buffer
  const int64_t budget = static_cast<int64_t>(optin) - static_cast<int64_t>(8 * kMaxWarps * sizeof(acc_t));
  int threads = kRowBlockThreads;  // what the other modes' kernels always fit (≤ 128 registers)
  if (staged_bytes <= budget) {
    const auto kernel = block_rows_kernel<T, G, true, kGeneral>;
    error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(staged_bytes));
    if (kGeneral && error == cudaSuccess) error = block_threads(kernel, threads);
    if (error != cudaSuccess) return error;
    kernel<<<blocks, threads, static_cast<size_t>(staged_bytes), stream>>>(a, p);
  } else {
    const auto kernel = block_rows_kernel<T, G, false, kGeneral>;
    if (kGeneral) error = block_threads(kernel, threads);
    if (error != cudaSuccess) return error;
    kernel<<<blocks, threads, 0, stream>>>(a, p);
  }
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t launch(const RowSoftmaxArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const Params<acc_t_of<T>> p = make_params<acc_t_of<T>>(a);
  return p.flags.general_divergence ? launch_mode<T, G, true>(a, p, stream) : launch_mode<T, G, false>(a, p, stream);
}

}  // namespace

cudaError_t launch_row_softmax(const RowSoftmaxArgs& args, cudaStream_t stream) {
  return visit_element_and_grad_types<ElementTypes>(args.type, args.grad_type, cudaErrorInvalidValue,
                                                    [&](auto* type, auto* grad) {
    return launch<std::remove_pointer_t<decltype(type)>, std::remove_pointer_t<decltype(grad)>>(args, stream);
  });
}

}  // namespace kdfast::cuda
