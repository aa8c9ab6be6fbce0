// The row-softmax family on CPU: KD, SKD (layernorm / l2 / standardize), KD-pt, label smoothing,
// instance re-weighted CE — one kernel with modes. The per-row math (normalisation map, loss and
// gradient coefficients, normalisation backward, guards) is csrc/common/row_math.h; this file is
// the memory traffic and the vector loops around it.
//
// Per row, while it is cache-resident (a 32k-class fp32 row pair is 256 KB, inside a 512 KB+ L2):
//   1. statistics: max and sum (and Σz² / Σ(z−μ)²) of the student and teacher rows;
//   2. every normalisation is a positive affine map h = A·(z − μ), so softmax(h/T) only needs
//      A/T and max z, and exp rows are written once into scratch together with their sums;
//   3. (a divergence other than the forward KL) one more pass over the stored exps for Σd and Σπ,
//      leaving π in the teacher's exp row;
//   4. loss and coefficients from the sums (row_coefficients), then g = ∂ℓ/∂h from the stored exps;
//   5. the normalisation's backward, which is again affine: dz = A·g − k·(z − μ) − c.
// Only the first pass reads from memory (the exp pass of the previous row has prefetched it) and
// only the gradient store writes to it. Exps are 2^x in fp32 (ScaledExp in vec_helpers.h).
//
// Compiled once per instruction set (see setup.py); the glue in csrc/cpu/glue.cpp picks one.
#include "kernels.h"
#include "vec_helpers.h"
// after vec_helpers.h: its SIMD zero_where_zero must be declared before the templates that call it
#include "../common/row_math.h"

namespace kdfast::cpu::CPU_CAPABILITY {
namespace {

namespace math = kdfast::row_math;

// A row's raw max and sum and its normalisation map, from the pass that reads it.
template <typename acc_t>
struct RowStatistics {
  acc_t max = 0, sum = 0;
  math::NormalisationMap<acc_t> map;
};

template <typename acc_t>
RowStatistics<acc_t> row_statistics(const acc_t* z, int64_t n, int normalize, acc_t kappa, acc_t eps) {
  RowStatistics<acc_t> s;
  acc_t squares = 0, centred = 0;
  row_max_sum(z, n, s.max, s.sum, math::needs_squares(normalize) ? &squares : nullptr);
  if (math::needs_centred_squares(normalize)) centred = centred_squares(z, n, math::row_mean(normalize, s.sum, n));
  s.map = math::normalisation_map(normalize, n, s.sum, squares, centred, kappa, eps);
  return s;
}

// bs = exp(as·(zs − ms)), bt = exp(at·(zt − mt)) and their sums, plus (kWeighted: the forward KL)
// Σ kl_entry(bt, lt − ls)/Zt in nats: KL(q‖p) = that + log(Zs/Zt).
template <typename acc_t, bool kWeighted = true>
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
    if constexpr (kWeighted) vw = vw + math::kl_entry(et, lt - ls);
  }
  acc_t s_sum = horizontal_sum(vzs), t_sum = horizontal_sum(vzt), w = horizontal_sum(vw);
  for (; i < n; ++i) {
    const acc_t ls = student_exp.arg(zs[i]), lt = teacher_exp.arg(zt[i]);
    bs[i] = student_exp(ls);
    bt[i] = teacher_exp(lt);
    s_sum += bs[i];
    t_sum += bt[i];
    if constexpr (kWeighted) w += math::kl_entry(bt[i], lt - ls);
  }
  zs_sum = s_sum;
  zt_sum = t_sum;
  if constexpr (!kWeighted) return;
  weighted = w * ScaledExp<acc_t>::kNatsPerUnit / t_sum;
  if (!std::isfinite(weighted)) {
    // A base-2 log-argument, (z − max)·scale·log2 e, and the unnormalised sum overflow where the
    // reference's (z − max)·scale and q·(…) do not (entries ~±0.9·FLT_MAX): such a row, or one that
    // really sums to ±inf or NaN, is summed again as the reference does, in nats with q = e^t/Zt.
    const acc_t inv_sum = 1 / t_sum;
    acc_t nats = 0;
    for (int64_t j = 0; j < n; ++j) {
      nats += math::kl_entry(bt[j] * inv_sum, (zt[j] - mt) * at - (zs[j] - ms) * as);
    }
    weighted = nats;
  }
}

// The divergence pass of a form other than the forward KL, after paired_exp (es, et, Zs, Zt): per
// entry p = es/Zs, q = et/Zt, log p = as·(zs − ms) − log Zs, log q likewise (in nats, from the
// logits: an underflowed p keeps its finite log, and no base-2 argument can overflow here), then
// d and π (row_math.h, divergence_entry). Returns Σd and Σπ and overwrites et with π, which the
// gradient pass reads in place of the teacher's exps.
template <int kForm, typename acc_t>
void divergence_pass(const math::DivergenceWeights<acc_t>& k, const acc_t* zs, const acc_t* zt, int64_t n, acc_t as,
                     acc_t ms, acc_t at, acc_t mt, const acc_t* es, acc_t* et_then_pi, acc_t zs_sum, acc_t zt_sum,
                     acc_t& d_sum, acc_t& pi_sum) {
  using Vec = Vectorized<acc_t>;
  const acc_t inv_zs = 1 / zs_sum, inv_zt = 1 / zt_sum;
  const acc_t log_zs = std::log(zs_sum), log_zt = std::log(zt_sum);
  const Vec vas(as), vms(ms), vat(at), vmt(mt), vinv_zs(inv_zs), vinv_zt(inv_zt), vlog_zs(log_zs), vlog_zt(log_zt);
  Vec vd(0), vpi(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec log_p = at::vec::fmsub(Vec::loadu(zs + i) - vms, vas, vlog_zs);
    const Vec log_q = at::vec::fmsub(Vec::loadu(zt + i) - vmt, vat, vlog_zt);
    const Vec p = Vec::loadu(es + i) * vinv_zs, q = Vec::loadu(et_then_pi + i) * vinv_zt;
    const math::DivergenceEntry<Vec> e = math::divergence_entry<kForm>(k, p, q, log_p, log_q);
    e.pi.store(et_then_pi + i);
    vd = vd + e.d;
    vpi = vpi + e.pi;
  }
  acc_t d = horizontal_sum(vd), pi = horizontal_sum(vpi);
  for (; i < n; ++i) {
    const acc_t log_p = (zs[i] - ms) * as - log_zs, log_q = (zt[i] - mt) * at - log_zt;
    const math::DivergenceEntry<acc_t> e =
        math::divergence_entry<kForm>(k, es[i] * inv_zs, et_then_pi[i] * inv_zt, log_p, log_q);
    et_then_pi[i] = e.pi;
    d += e.d;
    pi += e.pi;
  }
  d_sum = d;
  pi_sum = pi;
}

// Run-time form → its specialised loop (the form is fixed for a whole call).
template <typename acc_t>
void divergence_dispatch(int form, const math::DivergenceWeights<acc_t>& k, const acc_t* zs, const acc_t* zt,
                         int64_t n, acc_t as, acc_t ms, acc_t at, acc_t mt, const acc_t* es, acc_t* et_then_pi,
                         acc_t zs_sum, acc_t zt_sum, acc_t& d_sum, acc_t& pi_sum) {
  switch (form) {
#define KDFAST_DIVERGENCE_CASE(FORM)                                                                      \
  case FORM:                                                                                              \
    divergence_pass<FORM>(k, zs, zt, n, as, ms, at, mt, es, et_then_pi, zs_sum, zt_sum, d_sum, pi_sum);   \
    return;
    KDFAST_DIVERGENCE_CASE(kDivReverseKL)
    KDFAST_DIVERGENCE_CASE(kDivMixedKL)
    KDFAST_DIVERGENCE_CASE(kDivJSD)
    KDFAST_DIVERGENCE_CASE(kDivTVD)
    KDFAST_DIVERGENCE_CASE(kDivSkewForwardKL)
    KDFAST_DIVERGENCE_CASE(kDivSkewReverseKL)
#undef KDFAST_DIVERGENCE_CASE
    default:  // the glue rejects other codes; never leave the sums unset
      d_sum = pi_sum = std::numeric_limits<acc_t>::quiet_NaN();
  }
}

//: the vector at row + i when the row exists (kHas), else zeros (a missing row is never read)
template <bool kHas, typename acc_t>
inline Vectorized<acc_t> load_if(const acc_t* row, int64_t i) {
  if constexpr (kHas) {
    return Vectorized<acc_t>::loadu(row + i);
  } else {
    return Vectorized<acc_t>(0);
  }
}

template <bool kHas, typename acc_t>
inline acc_t read_if(const acc_t* row, int64_t i) {
  if constexpr (kHas) {
    return row[i];
  } else {
    return 0;
  }
}

// g = logit_gradient(bs, bt, b1) written to out (which may alias bs); with kAccumulate also Σg and
// Σg·(z − μ) for the normalisation's backward.
template <typename acc_t, bool kS, bool kT, bool k1, bool kAccumulate>
void gradient_pass(const acc_t* bs, const acc_t* bt, const acc_t* b1, const math::RowCoefficients<acc_t>& c,
                   const acc_t* z, acc_t mean, acc_t* out, int64_t n, acc_t& g_sum, acc_t& gd_sum) {
  using Vec = Vectorized<acc_t>;
  const Vec vmean(mean);
  Vec vg(0), vgd(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec g = math::logit_gradient<kS, kT, k1>(c, load_if<kS>(bs, i), load_if<kT>(bt, i), load_if<k1>(b1, i));
    g.store(out + i);
    if constexpr (kAccumulate) {
      vg = vg + g;
      vgd = at::vec::fmadd(g, Vec::loadu(z + i) - vmean, vgd);
    }
  }
  acc_t gs = horizontal_sum(vg), gds = horizontal_sum(vgd);
  for (; i < n; ++i) {
    const acc_t g = math::logit_gradient<kS, kT, k1>(c, read_if<kS>(bs, i), read_if<kT>(bt, i), read_if<k1>(b1, i));
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
void gradient_pass_acc(bool accumulate, const acc_t* bs, const acc_t* bt, const acc_t* b1,
                       const math::RowCoefficients<acc_t>& c, const acc_t* z, acc_t mean, acc_t* out, int64_t n,
                       acc_t& g_sum, acc_t& gd_sum) {
  if (accumulate) {
    gradient_pass<acc_t, kS, kT, k1, true>(bs, bt, b1, c, z, mean, out, n, g_sum, gd_sum);
  } else {
    gradient_pass<acc_t, kS, kT, k1, false>(bs, bt, b1, c, z, mean, out, n, g_sum, gd_sum);
  }
}

// Run-time flags → one of the specialised loops (the modes are fixed for a whole call).
template <typename acc_t>
void gradient_dispatch(bool has_s, bool has_t, bool has_1, bool accumulate, const acc_t* bs, const acc_t* bt,
                       const acc_t* b1, const math::RowCoefficients<acc_t>& c, const acc_t* z, acc_t mean,
                       acc_t* out, int64_t n, acc_t& g_sum, acc_t& gd_sum) {
#define KDFAST_GRAD_CASE(S, T, ONE)                                                                      \
  if (has_s == S && has_t == T && has_1 == ONE) {                                                        \
    gradient_pass_acc<acc_t, S, T, ONE>(accumulate, bs, bt, b1, c, z, mean, out, n, g_sum, gd_sum);      \
    return;                                                                                              \
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

// out = normalised_gradient(g, z) (out may be g itself)
template <typename acc_t>
void normalisation_backward_pass(const acc_t* g, const acc_t* z, int64_t n, const math::NormalisationBackward<acc_t>& b,
                                 acc_t* out) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    math::normalised_gradient(Vec::loadu(g + i), Vec::loadu(z + i), b).store(out + i);
  }
  for (; i < n; ++i) out[i] = math::normalised_gradient(g[i], z[i], b);
}

template <typename scalar_t, typename grad_t>
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
  auto* grad = static_cast<grad_t*>(a.grad);  // null: the loss only
  auto* loss = static_cast<acc_t*>(a.loss);

  const RowSoftmaxFlags f = row_softmax_flags(a);
  const math::RowSoftmaxScalars<acc_t> p = math::row_softmax_scalars<acc_t>(a);
  const acc_t inv_t = 1 / p.temperature;
  const math::DivergenceWeights<acc_t> weights = math::divergence_weights<acc_t>(f.divergence, a.divergence_param);
  // Where g goes first: straight into the output when nothing follows it.
  constexpr bool kSameType = std::is_same_v<grad_t, acc_t>;
  const bool direct = !f.normalised && kSameType;

  bool labels_ok = true;
  for (int64_t r = begin; r < end; ++r) {
    grad_t* grad_row = grad != nullptr ? grad + r * n : nullptr;
    const int64_t y = a.target != nullptr ? a.target[r] : -1;
    const RowAction action = row_action(y, a.target != nullptr, a.ignore_index, f.uses_label, n);
    if (action != RowAction::kCompute) {
      labels_ok = labels_ok && action == RowAction::kIgnore;
      if (grad_row != nullptr) zero_row(grad_row, n);
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
    const RowStatistics<acc_t> s = row_statistics(zs, n, f.normalize, p.kappa, p.eps);
    const acc_t* zt = f.reads_teacher ? widen_row(teacher + r * n, n, teacher_buffer) : nullptr;
    math::RowSums<acc_t> sums;
    sums.student_max = s.max;
    sums.student_sum = s.sum;
    if (f.uses_label) sums.student_label = zs[y];
    if (f.reads_teacher && f.uses_label) sums.teacher_label = zt[y];

    if (f.soft_teacher && f.general_divergence) {
      const RowStatistics<acc_t> t = row_statistics(zt, n, f.normalize, p.kappa, p.eps);
      const acc_t as = s.map.scale * inv_t, at = t.map.scale * inv_t;
      paired_exp<acc_t, false>(zs, zt, n, as, s.max, at, t.max, exp_student, exp_teacher, sums.student_exp,
                               sums.teacher_exp, sums.kl_weighted, next);
      divergence_dispatch(f.divergence, weights, zs, zt, n, as, s.max, at, t.max, exp_student, exp_teacher,
                          sums.student_exp, sums.teacher_exp, sums.divergence, sums.divergence_pi);
    } else if (f.soft_teacher) {
      const RowStatistics<acc_t> t = row_statistics(zt, n, f.normalize, p.kappa, p.eps);
      paired_exp(zs, zt, n, s.map.scale * inv_t, s.max, t.map.scale * inv_t, t.max, exp_student, exp_teacher,
                 sums.student_exp, sums.teacher_exp, sums.kl_weighted, next);
    } else if (f.partial_teacher) {
      sums.rest_max = math::max_keep_nan(row_max(zt, y), row_max(zt + y + 1, n - y - 1));
      const acc_t shift = math::exp_shift(sums.rest_max);
      sums.rest_exp = sum_exp(zt, y, inv_t, shift, static_cast<acc_t*>(nullptr)) +
                      sum_exp(zt + y + 1, n - y - 1, inv_t, shift, static_cast<acc_t*>(nullptr));
      sums.student_exp = sum_exp(zs, n, s.map.scale * inv_t, s.max, exp_student, &next);
    }
    if (f.unit_softmax && !f.share_unit) sums.unit_exp = sum_exp(zs, n, s.map.scale, s.max, exp_unit, &next);
    if (f.reweight) {
      sums.raw_teacher_max = row_max(zt, n);
      sums.raw_teacher_exp = sum_exp(zt, n, inv_t, sums.raw_teacher_max, static_cast<acc_t*>(nullptr));
    }
    const math::RowCoefficients<acc_t> c = math::row_coefficients(f, p, s.map, n, sums);
    loss[r] = c.loss;
    if (grad_row == nullptr) continue;

    acc_t* g = direct ? reinterpret_cast<acc_t*>(grad_row) : exp_student;
    acc_t g_sum = 0, gd_sum = 0;
    gradient_dispatch<acc_t>(f.kl, f.soft_teacher, f.unit_softmax && !f.share_unit, f.normalised, exp_student,
                             exp_teacher, exp_unit, c, zs, s.map.mean, g, n, g_sum, gd_sum);
    if (c.at_label != 0) {
      g[y] += c.at_label;
      g_sum += c.at_label;
      gd_sum += c.at_label * (zs[y] - s.map.mean);
    }
    if (f.normalised) {
      // the last pass writes the output itself when no narrowing follows
      acc_t* out = kSameType ? reinterpret_cast<acc_t*>(grad_row) : g;
      normalisation_backward_pass(g, zs, n, math::normalisation_backward(s.map, g_sum, gd_sum, n), out);
    }
    if (!kSameType) narrow_row(g, grad_row, n);
  }
  return labels_ok;
}

}  // namespace

bool row_softmax_rows(const RowSoftmaxArgs& args, int64_t begin, int64_t end, void* scratch) {
  return visit_element_and_grad_types<ElementTypes>(args.type, args.grad_type, false, [&](auto* type, auto* grad) {
    return rows<std::remove_pointer_t<decltype(type)>, std::remove_pointer_t<decltype(grad)>>(args, begin, end,
                                                                                              scratch);
  });
}

}  // namespace kdfast::cpu::CPU_CAPABILITY
