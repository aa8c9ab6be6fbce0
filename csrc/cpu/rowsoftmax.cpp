// The row-softmax family on CPU (spec §0, §1, §4, §6 kernel A): KD, SKD (layernorm / l2 /
// standardize), KD-pt, label smoothing, instance re-weighted CE — one kernel with modes.
//
// Per row, while it is cache-resident (a 32k-class fp32 row pair is 256 KB, inside a 512 KB+ L2):
//   1. statistics: max and sum (and Σz² / Σ(z−μ)²) of the student and teacher rows;
//   2. every normalisation is a positive affine map h = A·z + b, so softmax(h/T) only needs
//      A/T and max z, and exp rows are written once into scratch together with their sums;
//   3. loss from the sums, then g = ∂ℓ/∂h from the stored exps;
//   4. the normalisation's backward, which is again affine: dz = A·g − k·(z − μ) − c.
// Only the first pass reads from memory (the exp pass of the previous row has prefetched it) and
// only the gradient store writes to it. Exps are 2^x in fp32 (ScaledExp in vec_helpers.h).
//
// Compiled once per instruction set (see setup.py); the glue in csrc/bindings.cpp picks one.
#include "kernels.h"
#include "vec_helpers.h"

namespace kdfast::cpu::CPU_CAPABILITY {
namespace {

// Row statistics and the affine map h = A·(z − μ) (+ constant) of one normalisation, with what its
// backward needs: dz = A·g − A·back·Σg(z−μ)·(z − μ) − [centred]·A·Σg/C.
template <typename acc_t>
struct RowStats {
  acc_t max = 0, sum = 0;
  acc_t scale = 1;     // A
  acc_t mean = 0;      // μ (0 for "none" and "l2", which do not centre)
  acc_t back = 0;      // factor of the projection term; 0 where the statistic is clamped
  bool centred = false;
};

template <typename acc_t>
RowStats<acc_t> row_stats(const acc_t* z, int64_t n, int mode, acc_t kappa, acc_t eps) {
  RowStats<acc_t> s;
  acc_t squares = 0;
  row_max_sum(z, n, s.max, s.sum, mode == kNormL2 ? &squares : nullptr);
  if (mode == kNormLayerNorm) {
    // κ·(z − μ)/sqrt(var + eps), biased variance
    s.mean = s.sum / n;
    const acc_t var_eps = centred_squares(z, n, s.mean) / n + eps;
    s.scale = kappa / std::sqrt(var_eps);
    s.back = 1 / (n * var_eps);
    s.centred = true;
  } else if (mode == kNormL2) {
    // κ·z/max(‖z‖, eps); below eps the clamp cuts the norm out of the gradient
    const acc_t norm = std::sqrt(squares);
    if (norm >= eps) {
      s.scale = kappa / norm;
      s.back = 1 / (norm * norm);
    } else {
      s.scale = kappa / eps;
    }
  } else if (mode == kNormStandardize) {
    // κ·(z − μ)/(std + eps), unbiased std clamped at the smallest normal number like the reference
    s.mean = s.sum / n;
    const acc_t dof = n > 1 ? static_cast<acc_t>(n - 1) : acc_t(1);
    const acc_t var = centred_squares(z, n, s.mean) / dof;
    const acc_t tiny = std::numeric_limits<acc_t>::min();
    const acc_t std_dev = std::sqrt(std::max(var, tiny));
    const acc_t denom = std_dev + eps;
    s.scale = kappa / denom;
    s.back = var < tiny ? acc_t(0) : 1 / (denom * std_dev * dof);
    s.centred = true;
  }
  return s;
}

// bs = exp(as·(zs − ms)), bt = exp(at·(zt − mt)) and their sums, plus W = Σ bt·(log-args difference):
// KL(q‖p) = W/Zt + log(Zs/Zt). Teacher entries that underflow contribute 0 (0·log 0 = 0).
template <typename acc_t>
void paired_exp(const acc_t* zs, const acc_t* zt, int64_t n, acc_t as, acc_t ms, acc_t at, acc_t mt,
                acc_t* bs, acc_t* bt, acc_t& zs_sum, acc_t& zt_sum, acc_t& weighted, NextRowPrefetch& prefetch) {
  using Vec = Vectorized<acc_t>;
  const ScaledExp<acc_t> student_exp(as, ms), teacher_exp(at, mt);
  Vec vzs(0), vzt(0), vw(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    prefetch.step();
    const Vec ls = student_exp.arg(Vec::loadu(zs + i));
    const Vec lt = teacher_exp.arg(Vec::loadu(zt + i));
    const Vec es = student_exp(ls), et = teacher_exp(lt);
    es.store(bs + i);
    et.store(bt + i);
    vzs = vzs + es;
    vzt = vzt + et;
    vw = at::vec::fmadd(et, lt - ls, vw);
  }
  acc_t s_sum = horizontal_sum(vzs), t_sum = horizontal_sum(vzt), w = horizontal_sum(vw);
  for (; i < n; ++i) {
    const acc_t ls = student_exp.arg(zs[i]), lt = teacher_exp.arg(zt[i]);
    bs[i] = student_exp(ls);
    bt[i] = teacher_exp(lt);
    s_sum += bs[i];
    t_sum += bt[i];
    w += bt[i] * (lt - ls);
  }
  zs_sum = s_sum;
  zt_sum = t_sum;
  weighted = w * ScaledExp<acc_t>::kNatsPerUnit;
}

// g = k0 + cs·bs − ct·bt + c1·b1 (each term only when its row exists), written to out (which may
// alias bs); with kAccumulate also Σg and Σg·(z − μ) for the normalisation's backward.
template <typename acc_t, bool kS, bool kT, bool k1, bool kAccumulate>
void gradient_pass(const acc_t* bs, const acc_t* bt, const acc_t* b1, acc_t cs, acc_t ct, acc_t c1, acc_t k0,
                   const acc_t* z, acc_t mean, acc_t* out, int64_t n, acc_t& g_sum, acc_t& gd_sum) {
  using Vec = Vectorized<acc_t>;
  const Vec vcs(cs), vct(ct), vc1(c1), vk0(k0), vmean(mean);
  Vec vg(0), vgd(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec g = vk0;
    if constexpr (kS) g = at::vec::fmadd(vcs, Vec::loadu(bs + i), g);
    if constexpr (kT) g = g - vct * Vec::loadu(bt + i);
    if constexpr (k1) g = at::vec::fmadd(vc1, Vec::loadu(b1 + i), g);
    g.store(out + i);
    if constexpr (kAccumulate) {
      vg = vg + g;
      vgd = at::vec::fmadd(g, Vec::loadu(z + i) - vmean, vgd);
    }
  }
  acc_t gs = horizontal_sum(vg), gds = horizontal_sum(vgd);
  for (; i < n; ++i) {
    acc_t g = k0;
    if constexpr (kS) g += cs * bs[i];
    if constexpr (kT) g -= ct * bt[i];
    if constexpr (k1) g += c1 * b1[i];
    out[i] = g;
    if constexpr (kAccumulate) {
      gs += g;
      gds += g * (z[i] - mean);
    }
  }
  g_sum = gs;
  gd_sum = gds;
}

template <typename acc_t, bool kS, bool kT, bool k1>
void gradient_pass_acc(bool accumulate, const acc_t* bs, const acc_t* bt, const acc_t* b1, acc_t cs, acc_t ct,
                       acc_t c1, acc_t k0, const acc_t* z, acc_t mean, acc_t* out, int64_t n, acc_t& g_sum,
                       acc_t& gd_sum) {
  if (accumulate) {
    gradient_pass<acc_t, kS, kT, k1, true>(bs, bt, b1, cs, ct, c1, k0, z, mean, out, n, g_sum, gd_sum);
  } else {
    gradient_pass<acc_t, kS, kT, k1, false>(bs, bt, b1, cs, ct, c1, k0, z, mean, out, n, g_sum, gd_sum);
  }
}

// Run-time flags → one of the specialised loops (the modes are fixed for a whole call).
template <typename acc_t>
void gradient_dispatch(bool has_s, bool has_t, bool has_1, bool accumulate, const acc_t* bs, const acc_t* bt,
                       const acc_t* b1, acc_t cs, acc_t ct, acc_t c1, acc_t k0, const acc_t* z, acc_t mean,
                       acc_t* out, int64_t n, acc_t& g_sum, acc_t& gd_sum) {
#define KDFAST_GRAD_CASE(S, T, ONE)                                                                     \
  if (has_s == S && has_t == T && has_1 == ONE) {                                                       \
    gradient_pass_acc<acc_t, S, T, ONE>(accumulate, bs, bt, b1, cs, ct, c1, k0, z, mean, out, n, g_sum, \
                                        gd_sum);                                                        \
    return;                                                                                             \
  }
  KDFAST_GRAD_CASE(true, true, true)
  KDFAST_GRAD_CASE(true, true, false)
  KDFAST_GRAD_CASE(true, false, true)
  KDFAST_GRAD_CASE(true, false, false)
  KDFAST_GRAD_CASE(false, true, true)
  KDFAST_GRAD_CASE(false, true, false)
  KDFAST_GRAD_CASE(false, false, true)
  KDFAST_GRAD_CASE(false, false, false)
#undef KDFAST_GRAD_CASE
}

// out = A·g − k·(z − μ) − c (out may be g itself)
template <typename acc_t>
void normalisation_backward(const acc_t* g, const acc_t* z, int64_t n, acc_t scale, acc_t k, acc_t mean, acc_t c,
                            acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec vscale(scale), vk(k), vmean(mean), vc(c);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = vscale * Vec::loadu(g + i) - vk * (Vec::loadu(z + i) - vmean) - vc;
    v.store(out + i);
  }
  for (; i < n; ++i) out[i] = scale * g[i] - k * (z[i] - mean) - c;
}

template <typename scalar_t>
bool rows(const RowSoftmaxArgs& a, int64_t begin, int64_t end, void* scratch_bytes) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = a.classes;
  acc_t* scratch = static_cast<acc_t*>(scratch_bytes);
  acc_t* student_buffer = scratch;
  acc_t* teacher_buffer = scratch + n;
  acc_t* exp_student = scratch + 2 * n;  // softmax(h/T) numerators, later the gradient
  acc_t* exp_teacher = scratch + 3 * n;
  acc_t* exp_unit = scratch + 4 * n;     // softmax(h) numerators when T ≠ 1

  const auto* student = static_cast<const scalar_t*>(a.student);
  const auto* teacher = static_cast<const scalar_t*>(a.teacher);
  auto* grad = static_cast<scalar_t*>(a.grad);
  auto* loss = static_cast<acc_t*>(a.loss);

  const acc_t temperature = static_cast<acc_t>(a.temperature);
  const acc_t kappa = static_cast<acc_t>(a.multiplier), eps = static_cast<acc_t>(a.eps);
  const acc_t kl_weight = static_cast<acc_t>(a.kl_weight), ce_weight = static_cast<acc_t>(a.ce_weight);
  const acc_t uniform_weight = static_cast<acc_t>(a.uniform_weight);
  const bool kl = a.kl_weight != 0 && a.teacher_mode != kTeacherNone;
  const bool soft_teacher = kl && a.teacher_mode == kTeacherSoftmax;
  const bool partial_teacher = kl && a.teacher_mode == kTeacherPartial;
  const bool ce = a.ce_weight != 0;
  const bool unit_softmax = ce || a.uniform_weight != 0;     // p = softmax(h) at T = 1
  const bool share_unit = unit_softmax && kl && a.temperature == 1.0;
  const bool reweight = a.reweight && ce;
  const bool uses_label = ce || partial_teacher;
  const bool normalised = a.normalize != kNormNone;
  // Where g goes first: straight into the output when nothing follows it.
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const bool direct = !normalised && kSameType;

  bool labels_ok = true;
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* grad_row = grad + r * n;
    int64_t y = -1;
    if (a.target != nullptr) {
      y = a.target[r];
      if (y == a.ignore_index) {
        zero_row(grad_row, n);
        loss[r] = 0;
        continue;
      }
    }
    if (uses_label && (y < 0 || y >= n)) {
      labels_ok = false;
      zero_row(grad_row, n);
      loss[r] = 0;
      continue;
    }

    NextRowPrefetch next;
    if (r + 1 < end) {
      next.first = reinterpret_cast<const char*>(student + (r + 1) * n);
      next.second = teacher != nullptr ? reinterpret_cast<const char*>(teacher + (r + 1) * n) : nullptr;
      next.bytes = n * static_cast<int64_t>(sizeof(scalar_t));
    }

    const acc_t* zs = widen_row(student + r * n, n, student_buffer);
    const RowStats<acc_t> s = row_stats(zs, n, a.normalize, kappa, eps);
    const acc_t scale_t = s.scale / temperature;  // student log-softmax at T: scale_t·(z − max) − log Zs

    acc_t row_loss = 0;
    acc_t cs = 0, ct = 0, c1 = 0, k0 = 0, fix_y = 0;  // g = k0 + cs·bs − ct·bt + c1·b1, plus fix_y at y
    acc_t zs_sum = 1;

    if (soft_teacher) {
      const acc_t* zt = widen_row(teacher + r * n, n, teacher_buffer);
      const RowStats<acc_t> t = row_stats(zt, n, a.normalize, kappa, eps);
      acc_t zt_sum, weighted;
      paired_exp(zs, zt, n, scale_t, s.max, t.scale / temperature, t.max, exp_student, exp_teacher, zs_sum, zt_sum,
                 weighted, next);
      row_loss += kl_weight * (weighted / zt_sum + std::log(zs_sum / zt_sum));
      cs = kl_weight / (temperature * zs_sum);
      ct = kl_weight / (temperature * zt_sum);
    } else if (partial_teacher) {
      // q keeps ρ = σ_T(z^t)[y] and spreads 1 − ρ evenly over the other classes; log(1 − ρ) comes
      // from the log-sum-exp over c ≠ y with its own max, never from 1 − ρ (spec §4c).
      const acc_t* zt = widen_row(teacher + r * n, n, teacher_buffer);
      const acc_t inv_t = 1 / temperature;
      const acc_t rest_max = std::max(row_max(zt, y), row_max(zt + y + 1, n - y - 1));
      const acc_t teacher_max = std::max(zt[y], rest_max);
      const acc_t log_true = (zt[y] - teacher_max) * inv_t;
      acc_t log_rest = kNegInf<acc_t>;
      if (n > 1) {
        const acc_t rest_sum = sum_exp(zt, y, inv_t, rest_max, static_cast<acc_t*>(nullptr)) +
                               sum_exp(zt + y + 1, n - y - 1, inv_t, rest_max, static_cast<acc_t*>(nullptr));
        log_rest = std::log(rest_sum) + (rest_max - teacher_max) * inv_t;
      }
      const acc_t log_total = std::log(std::exp(log_true) + std::exp(log_rest));  // one term is exp(0)
      const acc_t log_rho = log_true - log_total, log_not_rho = log_rest - log_total;
      const acc_t rho = std::exp(log_rho), not_rho = std::exp(log_not_rho);

      zs_sum = sum_exp(zs, n, scale_t, s.max, exp_student, &next);
      const acc_t log_zs = std::log(zs_sum);
      const acc_t log_p_true = scale_t * (zs[y] - s.max) - log_zs;
      const acc_t sum_log_p = scale_t * (s.sum - n * s.max) - n * log_zs;
      acc_t kl_value = 0;
      if (rho != 0) kl_value += rho * (log_rho - log_p_true);  // 0·log 0 = 0 (a NaN still counts)
      acc_t q_other = 0;
      if (n > 1 && not_rho != 0) {
        const acc_t others = static_cast<acc_t>(n - 1);
        q_other = not_rho / others;
        kl_value += not_rho * (log_not_rho - std::log(others)) - q_other * (sum_log_p - log_p_true);
      }
      row_loss += kl_weight * kl_value;
      cs = kl_weight / (temperature * zs_sum);
      k0 -= kl_weight / temperature * q_other;
      fix_y -= kl_weight / temperature * (rho - q_other);
    }

    if (unit_softmax) {
      acc_t unit_sum;
      if (share_unit) {
        unit_sum = zs_sum;
      } else {
        unit_sum = sum_exp(zs, n, s.scale, s.max, exp_unit, &next);
      }
      const acc_t log_unit = std::log(unit_sum);
      if (ce) {
        const acc_t nll = log_unit - s.scale * (zs[y] - s.max);
        acc_t weight = 1;
        if (reweight) {
          // detached w = 1 − α(1 − ρ)/max(1 − p_y, eps), ρ from the raw teacher at T
          const acc_t* zt = widen_row(teacher + r * n, n, teacher_buffer);
          const acc_t inv_t = 1 / temperature;
          const acc_t teacher_max = row_max(zt, n);
          const acc_t teacher_sum = sum_exp(zt, n, inv_t, teacher_max, static_cast<acc_t*>(nullptr));
          const acc_t rho = std::exp((zt[y] - teacher_max) * inv_t) / teacher_sum;
          const acc_t p_true = std::exp(-nll);
          weight = 1 - static_cast<acc_t>(a.reweight_alpha) * (1 - rho) /
                           std::max(1 - p_true, static_cast<acc_t>(a.reweight_eps));
        }
        row_loss += ce_weight * weight * nll;
        c1 += ce_weight * weight / unit_sum;
        fix_y -= ce_weight * weight;
      }
      if (a.uniform_weight != 0) {
        // −mean_c log p_c = log Z − mean of the log-args
        row_loss += uniform_weight * (log_unit - s.scale * (s.sum / n - s.max));
        c1 += uniform_weight / unit_sum;
        k0 -= uniform_weight / n;
      }
      if (share_unit) {
        cs += c1;
        c1 = 0;
      }
    }
    loss[r] = row_loss;

    acc_t* g = direct ? reinterpret_cast<acc_t*>(grad_row) : exp_student;
    acc_t g_sum = 0, gd_sum = 0;
    const bool has_s = kl, has_t = soft_teacher, has_1 = unit_softmax && !share_unit;
    gradient_dispatch<acc_t>(has_s, has_t, has_1, normalised, exp_student, exp_teacher, exp_unit, cs, ct, c1, k0, zs,
                             s.mean, g, n, g_sum, gd_sum);
    if (fix_y != 0) {
      g[y] += fix_y;
      g_sum += fix_y;
      gd_sum += fix_y * (zs[y] - s.mean);
    }
    if (normalised) {
      // the last pass writes the output itself when no narrowing follows
      const acc_t centre = s.centred ? s.scale * g_sum / n : acc_t(0);
      acc_t* out = kSameType ? reinterpret_cast<acc_t*>(grad_row) : g;
      normalisation_backward(g, zs, n, s.scale, s.scale * s.back * gd_sum, s.mean, centre, out);
    }
    if (!kSameType) narrow_row(g, grad_row, n);
  }
  return labels_ok;
}

}  // namespace

bool row_softmax_rows(const RowSoftmaxArgs& args, int64_t begin, int64_t end, void* scratch) {
  switch (args.type) {
    case ElementType::kFloat32: return rows<float>(args, begin, end, scratch);
    case ElementType::kFloat64: return rows<double>(args, begin, end, scratch);
    case ElementType::kBFloat16: return rows<c10::BFloat16>(args, begin, end, scratch);
    case ElementType::kFloat16: return rows<c10::Half>(args, begin, end, scratch);
  }
  return false;
}

}  // namespace kdfast::cpu::CPU_CAPABILITY
