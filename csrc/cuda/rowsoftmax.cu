// The row-softmax family on CUDA (spec §6 kernel A); the same per-row math as csrc/cpu/rowsoftmax.cpp
// (read that file's header for the algebra): statistics → exp sums → loss and gradient
// coefficients → gradient (→ normalisation backward). Exps are recomputed in the gradient pass
// rather than stored: on a GPU the passes are bound by memory, not by exp.
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

#include <algorithm>

namespace kdfast::cuda {
namespace {

using kdfast::cpu::kNormL2;
using kdfast::cpu::kNormLayerNorm;
using kdfast::cpu::kNormNone;
using kdfast::cpu::kNormStandardize;
using kdfast::cpu::kTeacherNone;
using kdfast::cpu::kTeacherPartial;
using kdfast::cpu::kTeacherSoftmax;

//: largest C handled by one warp per row
constexpr int64_t kWarpRowMaxClasses = 1024;
//: rows per block in the warp-per-row shape
constexpr int kWarpsPerBlock = 4;
//: threads per block in the block-per-row shapes
constexpr int kRowBlockThreads = 512;
//: grid cap; larger batches loop over rows (grid-stride)
constexpr int64_t kMaxGridRows = 65535LL * 32;

// Mode flags and scalar parameters, identical for every row of a call.
template <typename acc_t>
struct Params {
  int64_t n;
  int normalize;
  bool kl, soft_teacher, partial_teacher, ce, uniform, unit_softmax, share_unit, reweight, uses_label, normalised;
  acc_t temperature, kappa, eps, kl_weight, ce_weight, uniform_weight, reweight_alpha, reweight_eps;
  int64_t ignore_index;
};

template <typename acc_t>
Params<acc_t> make_params(const RowSoftmaxArgs& a) {
  Params<acc_t> p;
  p.n = a.classes;
  p.normalize = a.normalize;
  p.kl = a.kl_weight != 0 && a.teacher_mode != kTeacherNone;
  p.soft_teacher = p.kl && a.teacher_mode == kTeacherSoftmax;
  p.partial_teacher = p.kl && a.teacher_mode == kTeacherPartial;
  p.ce = a.ce_weight != 0;
  p.uniform = a.uniform_weight != 0;
  p.unit_softmax = p.ce || p.uniform;
  p.share_unit = p.unit_softmax && p.kl && a.temperature == 1.0;
  p.reweight = a.reweight && p.ce;
  p.uses_label = p.ce || p.partial_teacher;
  p.normalised = a.normalize != kNormNone;
  p.temperature = static_cast<acc_t>(a.temperature);
  p.kappa = static_cast<acc_t>(a.multiplier);
  p.eps = static_cast<acc_t>(a.eps);
  p.kl_weight = static_cast<acc_t>(a.kl_weight);
  p.ce_weight = static_cast<acc_t>(a.ce_weight);
  p.uniform_weight = static_cast<acc_t>(a.uniform_weight);
  p.reweight_alpha = static_cast<acc_t>(a.reweight_alpha);
  p.reweight_eps = static_cast<acc_t>(a.reweight_eps);
  p.ignore_index = a.ignore_index;
  return p;
}

// Normalisation of one row as the affine map h = scale·(z − mean) (+ const), with its backward
// dz = scale·g − scale·back·Σg(z−μ)·(z − μ) − [centred]·scale·Σg/C (same as the CPU kernel).
template <typename acc_t>
struct Stats {
  acc_t max, sum, scale, mean, back;
  bool centred;
};

template <typename acc_t>
__device__ Stats<acc_t> finish_stats(int mode, acc_t max, acc_t sum, acc_t squares, acc_t centred_squares, int64_t n,
                                     acc_t kappa, acc_t eps) {
  Stats<acc_t> s{max, sum, acc_t(1), acc_t(0), acc_t(0), false};
  if (mode == kNormLayerNorm) {
    s.mean = sum / n;
    const acc_t var_eps = centred_squares / n + eps;
    s.scale = kappa / sqrt_acc(var_eps);
    s.back = 1 / (n * var_eps);
    s.centred = true;
  } else if (mode == kNormL2) {
    const acc_t norm = sqrt_acc(squares);
    if (norm >= eps) {
      s.scale = kappa / norm;
      s.back = 1 / (norm * norm);
    } else {
      s.scale = kappa / eps;
    }
  } else if (mode == kNormStandardize) {
    s.mean = sum / n;
    const acc_t dof = n > 1 ? acc_t(n - 1) : acc_t(1);
    const acc_t var = centred_squares / dof;
    const acc_t tiny = sizeof(acc_t) == 4 ? acc_t(1.17549435e-38f) : acc_t(2.2250738585072014e-308);
    const acc_t std_dev = sqrt_acc(var > tiny ? var : tiny);
    const acc_t denom = std_dev + eps;
    s.scale = kappa / denom;
    s.back = var < tiny ? acc_t(0) : 1 / (denom * std_dev * dof);
    s.centred = true;
  }
  return s;
}

// Statistics of the student row and, when given, the teacher row (same normalisation).
template <bool kWarpGroup, typename S, typename acc_t>
__device__ void row_stats(const S* zs, const S* zt, const Params<acc_t>& p, int lane, int lanes, acc_t* shared,
                          Stats<acc_t>& s, Stats<acc_t>& t) {
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
  if (p.normalize == kNormLayerNorm || p.normalize == kNormStandardize) {
    const acc_t ms = sums[0] / p.n, mt = sums[1] / p.n;
    for_each_pair(zs, zt, p.n, lane, lanes, [&](int64_t, acc_t a, acc_t b) {
      centred[0] += (a - ms) * (a - ms);
      centred[1] += (b - mt) * (b - mt);
    });
    group_reduce<kWarpGroup, false>(centred, shared);
  }
  s = finish_stats(p.normalize, maxes[0], sums[0], sums[2], centred[0], p.n, p.kappa, p.eps);
  t = finish_stats(p.normalize, maxes[1], sums[1], sums[3], centred[1], p.n, p.kappa, p.eps);
}

// Loss and gradient of one row: `zs`, `zt` are its student and teacher rows (global memory of type
// T, or shared memory already widened to acc_t); `grad_row` is global. Every thread of the group
// calls this with the same row.
template <bool kWarpGroup, typename S, typename T, typename acc_t>
__device__ void process_row(const S* zs, const S* zt, int64_t y, const Params<acc_t>& p, T* grad_row, acc_t* loss_out,
                            int lane, int lanes, acc_t* shared) {
  const int64_t n = p.n;
  const bool has_teacher = zt != nullptr;
  Stats<acc_t> s, t;
  row_stats<kWarpGroup>(zs, has_teacher ? zt : nullptr, p, lane, lanes, shared, s, t);
  const acc_t scale_t = s.scale / p.temperature;
  // a teacher read raw (partial teacher, re-weighting) is not normalised
  const acc_t teacher_scale = p.soft_teacher ? t.scale / p.temperature : 1 / p.temperature;

  // label-dependent entries, read once by every thread (broadcast through the cache); a label that
  // only masks rows (no mode uses it) may be anything, so it is range-checked before the read
  acc_t zs_y = 0, zt_y = 0;
  if (y >= 0 && y < n) {
    zs_y = to_acc(zs[y]);
    if (has_teacher) zt_y = to_acc(zt[y]);
  }

  // exp sums: [0] Zs at T, [1] Zt, [2] W = Σ et·(lt − ls), [3] Z at T = 1, [4] Σ_{c≠y} teacher exps
  acc_t rest_max[1] = {-INFINITY};
  if (p.partial_teacher) {
    for_each_pair(zt, static_cast<const S*>(nullptr), n, lane, lanes, [&](int64_t i, acc_t b, acc_t) {
      if (i != y) rest_max[0] = fmax(rest_max[0], b);
    });
    group_reduce<kWarpGroup, true>(rest_max, shared);
  }
  acc_t sums[5] = {0, 0, 0, 0, 0};
  for_each_pair(zs, has_teacher ? zt : nullptr, n, lane, lanes, [&](int64_t i, acc_t a, acc_t b) {
    const acc_t ls = (a - s.max) * scale_t;
    if (p.kl) sums[0] += exp_acc(ls);
    if (p.soft_teacher) {
      const acc_t lt = (b - t.max) * teacher_scale;
      const acc_t et = exp_acc(lt);
      sums[1] += et;
      sums[2] += et * (lt - ls);
    } else if (p.reweight) {
      sums[1] += exp_acc((b - t.max) * teacher_scale);
    }
    if (p.unit_softmax && !p.share_unit) sums[3] += exp_acc((a - s.max) * s.scale);
    if (p.partial_teacher && i != y) sums[4] += exp_acc((b - rest_max[0]) * teacher_scale);
  });
  group_reduce<kWarpGroup, false>(sums, shared);

  acc_t row_loss = 0, cs = 0, ct = 0, c1 = 0, k0 = 0, fix_y = 0;
  if (p.soft_teacher) {
    row_loss += p.kl_weight * (sums[2] / sums[1] + log_acc(sums[0] / sums[1]));
    cs = p.kl_weight / (p.temperature * sums[0]);
    ct = p.kl_weight / (p.temperature * sums[1]);
  } else if (p.partial_teacher) {
    const acc_t teacher_max = fmax(zt_y, rest_max[0]);
    const acc_t log_true = (zt_y - teacher_max) * teacher_scale;
    const acc_t log_rest = n > 1 ? log_acc(sums[4]) + (rest_max[0] - teacher_max) * teacher_scale : acc_t(-INFINITY);
    const acc_t log_total = log_acc(exp_acc(log_true) + exp_acc(log_rest));
    const acc_t log_rho = log_true - log_total, log_not_rho = log_rest - log_total;
    const acc_t rho = exp_acc(log_rho), not_rho = exp_acc(log_not_rho);
    const acc_t log_zs = log_acc(sums[0]);
    const acc_t log_p_true = scale_t * (zs_y - s.max) - log_zs;
    const acc_t sum_log_p = scale_t * (s.sum - n * s.max) - n * log_zs;
    acc_t kl_value = 0, q_other = 0;
    if (rho != 0) kl_value += rho * (log_rho - log_p_true);
    if (n > 1 && not_rho != 0) {
      const acc_t others = acc_t(n - 1);
      q_other = not_rho / others;
      kl_value += not_rho * (log_not_rho - log_acc(others)) - q_other * (sum_log_p - log_p_true);
    }
    row_loss += p.kl_weight * kl_value;
    cs = p.kl_weight / (p.temperature * sums[0]);
    k0 -= p.kl_weight / p.temperature * q_other;
    fix_y -= p.kl_weight / p.temperature * (rho - q_other);
  }
  if (p.unit_softmax) {
    const acc_t unit_sum = p.share_unit ? sums[0] : sums[3];
    const acc_t log_unit = log_acc(unit_sum);
    if (p.ce) {
      const acc_t nll = log_unit - s.scale * (zs_y - s.max);
      acc_t weight = 1;
      if (p.reweight) {
        const acc_t rho = exp_acc((zt_y - t.max) * teacher_scale) / sums[1];
        const acc_t slack = 1 - exp_acc(-nll);
        weight = 1 - p.reweight_alpha * (1 - rho) / (slack > p.reweight_eps ? slack : p.reweight_eps);
      }
      row_loss += p.ce_weight * weight * nll;
      c1 += p.ce_weight * weight / unit_sum;
      fix_y -= p.ce_weight * weight;
    }
    if (p.uniform) {
      row_loss += p.uniform_weight * (log_unit - s.scale * (s.sum / n - s.max));
      c1 += p.uniform_weight / unit_sum;
      k0 -= p.uniform_weight / n;
    }
    if (p.share_unit) {
      cs += c1;
      c1 = 0;
    }
  }
  if (lane == 0) *loss_out = row_loss;

  const acc_t t_scale_soft = p.soft_teacher ? teacher_scale : acc_t(0);
  auto gradient = [&](int64_t i, acc_t a, acc_t b) {
    acc_t g = k0;
    if (p.kl) g += cs * exp_acc((a - s.max) * scale_t);
    if (p.soft_teacher) g -= ct * exp_acc((b - t.max) * t_scale_soft);
    if (c1 != 0) g += c1 * exp_acc((a - s.max) * s.scale);
    if (i == y) g += fix_y;
    return g;
  };
  const S* teacher_for_grad = p.soft_teacher ? zt : nullptr;
  if (!p.normalised) {
    for_each_pair(zs, teacher_for_grad, n, lane, lanes,
                  [&](int64_t i, acc_t a, acc_t b) { grad_row[i] = from_acc<T>(gradient(i, a, b)); });
    return;
  }
  acc_t g_sums[2] = {0, 0};  // Σg, Σg·(z − μ)
  for_each_pair(zs, teacher_for_grad, n, lane, lanes, [&](int64_t i, acc_t a, acc_t b) {
    const acc_t g = gradient(i, a, b);
    g_sums[0] += g;
    g_sums[1] += g * (a - s.mean);
  });
  group_reduce<kWarpGroup, false>(g_sums, shared);
  const acc_t k = s.scale * s.back * g_sums[1];
  const acc_t centre = s.centred ? s.scale * g_sums[0] / n : acc_t(0);
  for_each_pair(zs, teacher_for_grad, n, lane, lanes, [&](int64_t i, acc_t a, acc_t b) {
    grad_row[i] = from_acc<T>(s.scale * gradient(i, a, b) - k * (a - s.mean) - centre);
  });
}

template <typename T>
__device__ __forceinline__ bool skip_row(const RowSoftmaxArgs& a, const Params<acc_t_of<T>>& p, int64_t row,
                                         int64_t& y) {
  y = -1;
  if (a.target != nullptr) {
    y = a.target[row];
    if (y == p.ignore_index) return true;
  }
  return p.uses_label && (y < 0 || y >= p.n);
}

template <typename T>
__device__ void zero_row(T* grad_row, int64_t n, int lane, int lanes) {
  for (int64_t i = lane; i < n; i += lanes) grad_row[i] = from_acc<T>(acc_t_of<T>(0));
}

// One warp per row.
template <typename T>
__global__ void warp_rows_kernel(RowSoftmaxArgs a, Params<acc_t_of<T>> p) {
  using acc_t = acc_t_of<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const T* student = static_cast<const T*>(a.student);
  const T* teacher = static_cast<const T*>(a.teacher);
  T* grad = static_cast<T*>(a.grad);
  acc_t* loss = static_cast<acc_t*>(a.loss);
  for (int64_t row = first; row < a.rows; row += stride) {
    const int64_t offset = row * p.n;
    int64_t y;
    if (skip_row<T>(a, p, row, y)) {
      zero_row(grad + offset, p.n, lane, kWarpSize);
      if (lane == 0) loss[row] = 0;
      continue;
    }
    process_row<true>(student + offset, teacher != nullptr ? teacher + offset : nullptr, y, p, grad + offset,
                      loss + row, lane, kWarpSize, static_cast<acc_t*>(nullptr));
  }
}

// One block per row; kStage: widen the rows into shared memory once, then every pass reads there.
template <typename T, bool kStage>
__global__ void block_rows_kernel(RowSoftmaxArgs a, Params<acc_t_of<T>> p) {
  using acc_t = acc_t_of<T>;
  extern __shared__ unsigned char dynamic_shared[];
  __shared__ acc_t reduction[8 * kMaxWarps];
  acc_t* staged = reinterpret_cast<acc_t*>(dynamic_shared);
  const T* student = static_cast<const T*>(a.student);
  const T* teacher = static_cast<const T*>(a.teacher);
  T* grad = static_cast<T*>(a.grad);
  acc_t* loss = static_cast<acc_t*>(a.loss);
  const int lane = threadIdx.x, lanes = blockDim.x;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t offset = row * p.n;
    int64_t y;
    if (skip_row<T>(a, p, row, y)) {
      zero_row(grad + offset, p.n, lane, lanes);
      if (lane == 0) loss[row] = 0;
      continue;
    }
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
      process_row<false>(static_cast<const acc_t*>(zs_shared), static_cast<const acc_t*>(zt_shared), y, p,
                         grad + offset, loss + row, lane, lanes, reduction);
    } else {
      process_row<false>(student + offset, zt, y, p, grad + offset, loss + row, lane, lanes, reduction);
    }
  }
}

template <typename T>
cudaError_t launch(const RowSoftmaxArgs& a, cudaStream_t stream) {
  using acc_t = acc_t_of<T>;
  if (a.rows == 0) return cudaSuccess;
  const Params<acc_t> p = make_params<acc_t>(a);
  if (a.classes <= kWarpRowMaxClasses) {
    const int64_t blocks = std::min<int64_t>((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridRows);
    warp_rows_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(a, p);
    return cudaGetLastError();
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(a.rows, kMaxGridRows));
  const int64_t staged_rows = a.teacher != nullptr ? 2 : 1;
  const int64_t staged_bytes = staged_rows * a.classes * static_cast<int64_t>(sizeof(acc_t));
  int device = 0, optin = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error != cudaSuccess) return error;
  // leave room for the static reduction buffer
  const int64_t budget = static_cast<int64_t>(optin) - static_cast<int64_t>(8 * kMaxWarps * sizeof(acc_t));
  if (staged_bytes <= budget) {
    error = cudaFuncSetAttribute(block_rows_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(staged_bytes));
    if (error != cudaSuccess) return error;
    block_rows_kernel<T, true><<<blocks, kRowBlockThreads, static_cast<size_t>(staged_bytes), stream>>>(a, p);
  } else {
    block_rows_kernel<T, false><<<blocks, kRowBlockThreads, 0, stream>>>(a, p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_row_softmax(const RowSoftmaxArgs& args, cudaStream_t stream) {
  switch (args.type) {
    case ElementType::kFloat32: return launch<float>(args, stream);
    case ElementType::kFloat64: return launch<double>(args, stream);
    case ElementType::kBFloat16: return launch<__nv_bfloat16>(args, stream);
    case ElementType::kFloat16: return launch<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kdfast::cuda
