// The per-row math of kdfast's kernels, written once for the CPU and CUDA kernels (and mirrored by
// the Triton stages of the same names in kdfast/backends/triton/): every normalisation, the loss
// and gradient coefficients computed from a row's sums, the normalisation's backward, and every
// guard. The kernels keep only what is theirs: memory traffic, vectorisation and reductions.
//
// Semantics (those of kdfast.reference):
//   * −inf logits are masked entries with probability 0: 0·log 0 = 0; a student −inf where the
//     teacher has mass gives +inf.
//   * NaN anywhere in a row makes the row's loss and its whole gradient row NaN (every guard below
//     tests for an exact 0 or compares so that NaN falls through to the arithmetic).
//   * rows whose label is ignore_index give loss 0 and a zero gradient (contract.h, row_action).
//
// Elementwise functions are templates over the value type V: an fp32/fp64 scalar (CUDA, CPU tails)
// or a SIMD vector (the CPU kernels' at::vec::Vectorized, which supplies its own zero_where_zero
// overload before including this header).
#pragma once

#include <float.h>
#include <math.h>

#include "contract.h"

namespace kdfast::row_math {

// ---- scalar helpers, host and device, fp32 and fp64 ------------------------------------------------

KDFAST_HOST_DEVICE float sqrt_of(float x) { return sqrtf(x); }
KDFAST_HOST_DEVICE double sqrt_of(double x) { return sqrt(x); }
KDFAST_HOST_DEVICE float exp_of(float x) { return expf(x); }
KDFAST_HOST_DEVICE double exp_of(double x) { return exp(x); }
KDFAST_HOST_DEVICE float log_of(float x) { return logf(x); }
KDFAST_HOST_DEVICE double log_of(double x) { return log(x); }
KDFAST_HOST_DEVICE float abs_of(float x) { return fabsf(x); }
KDFAST_HOST_DEVICE double abs_of(double x) { return fabs(x); }

template <typename acc_t> KDFAST_HOST_DEVICE acc_t negative_infinity() { return -acc_t(INFINITY); }
//: the smallest positive normal number
template <typename acc_t> KDFAST_HOST_DEVICE acc_t tiny() { return sizeof(acc_t) == 4 ? acc_t(FLT_MIN) : acc_t(DBL_MIN); }

//: max(x, low) that keeps a NaN x NaN (fmax would drop it)
template <typename acc_t> KDFAST_HOST_DEVICE acc_t clamp_below(acc_t x, acc_t low) { return x < low ? low : x; }
//: the larger of a and b, NaN if either is NaN
template <typename acc_t> KDFAST_HOST_DEVICE acc_t max_keep_nan(acc_t a, acc_t b) {
  return (a != a || b != b) ? a + b : (a < b ? b : a);
}

// ---- selects (the CPU kernels overload them for SIMD vectors, like zero_where_zero) ------------------

//: a == b ? x : y (NaN compares unequal)
template <typename V> KDFAST_HOST_DEVICE V select_equal(const V& a, const V& b, const V& x, const V& y) {
  return a == b ? x : y;
}
//: a > b ? x : y (NaN compares false)
template <typename V> KDFAST_HOST_DEVICE V select_greater(const V& a, const V& b, const V& x, const V& y) {
  return a > b ? x : y;
}

// ---- guards ---------------------------------------------------------------------------------------

//: 0 where `weight` is exactly 0, else x (a NaN weight keeps x): the 0·log 0 = 0 rule
template <typename V> KDFAST_HOST_DEVICE V zero_where_zero(const V& weight, const V& x) {
  return weight == V(0) ? V(0) : x;
}

//: one entry of Σ q·(log q − log p) up to q's normaliser: e^t·(l^t − l^s), 0 where e^t = 0 (a masked
//: or underflowed teacher entry, whatever the student holds there)
template <typename V> KDFAST_HOST_DEVICE V kl_entry(const V& teacher_exp, const V& log_ratio) {
  return teacher_exp * zero_where_zero(teacher_exp, log_ratio);
}

//: the shift of a sum of exps over a set whose max is `max`: the max itself, or 0 when the set is
//: all −inf (an all-masked set then sums to exactly 0 instead of NaN)
template <typename acc_t> KDFAST_HOST_DEVICE acc_t exp_shift(acc_t max) {
  return max == negative_infinity<acc_t>() ? acc_t(0) : max;
}

// ---- normalisation: h = scale·(z − mean) (+ a constant the softmax ignores) ---------------------

template <typename acc_t>
struct NormalisationMap {
  acc_t scale = 1;       // A
  acc_t mean = 0;        // μ (0 for "none" and "l2", which do not centre)
  acc_t back = 0;        // factor of the projection term of the backward; 0 where a statistic is clamped
  bool centred = false;  // the backward subtracts the gradient's mean
};

KDFAST_HOST_DEVICE bool needs_squares(int normalize) { return normalize == kNormL2; }
KDFAST_HOST_DEVICE bool needs_centred_squares(int normalize) {
  return normalize == kNormLayerNorm || normalize == kNormStandardize;
}
//: the mean the centred squares are taken around (0 where the map does not centre)
template <typename acc_t> KDFAST_HOST_DEVICE acc_t row_mean(int normalize, acc_t sum, int64_t n) {
  return needs_centred_squares(normalize) ? sum / acc_t(n) : acc_t(0);
}

// From the row's Σz, Σz² (l2) and Σ(z − μ)² (layernorm, standardize):
//   layernorm:   κ·(z − μ)/√(var + ε), biased variance;
//   l2:          κ·z/max(‖z‖, ε), the clamp cuts the norm out of the gradient below ε;
//   standardize: κ·(z − μ)/(σ + ε), unbiased σ, its variance clamped at the smallest normal number.
template <typename acc_t>
KDFAST_HOST_DEVICE NormalisationMap<acc_t> normalisation_map(int normalize, int64_t n, acc_t sum, acc_t squares,
                                                             acc_t centred_squares, acc_t kappa, acc_t eps) {
  NormalisationMap<acc_t> map;
  if (normalize == kNormLayerNorm) {
    map.mean = sum / acc_t(n);
    const acc_t var_eps = centred_squares / acc_t(n) + eps;
    map.scale = kappa / sqrt_of(var_eps);
    map.back = 1 / (acc_t(n) * var_eps);
    map.centred = true;
  } else if (normalize == kNormL2) {
    const acc_t norm = sqrt_of(squares);
    if (norm < eps) {
      map.scale = kappa / eps;
    } else {  // NaN falls through here
      map.scale = kappa / norm;
      map.back = 1 / (norm * norm);
    }
  } else if (normalize == kNormStandardize) {
    map.mean = sum / acc_t(n);
    const acc_t dof = n > 1 ? acc_t(n - 1) : acc_t(1);
    const acc_t var = centred_squares / dof;
    const acc_t std_dev = sqrt_of(clamp_below(var, tiny<acc_t>()));
    const acc_t denom = std_dev + eps;
    map.scale = kappa / denom;
    map.back = var < tiny<acc_t>() ? acc_t(0) : 1 / (denom * std_dev * dof);
    map.centred = true;
  }
  return map;
}

// dz = scale·g − k·(z − μ) − centre, from Σg and Σg·(z − μ) over the row
template <typename acc_t>
struct NormalisationBackward {
  acc_t scale, k, mean, centre;
};

template <typename acc_t>
KDFAST_HOST_DEVICE NormalisationBackward<acc_t> normalisation_backward(const NormalisationMap<acc_t>& map,
                                                                       acc_t grad_sum, acc_t grad_dot_centred,
                                                                       int64_t n) {
  return {map.scale, map.scale * map.back * grad_dot_centred, map.mean,
          map.centred ? map.scale * grad_sum / acc_t(n) : acc_t(0)};
}

template <typename V, typename acc_t>
KDFAST_HOST_DEVICE V normalised_gradient(const V& g, const V& z, const NormalisationBackward<acc_t>& b) {
  return V(b.scale) * g - V(b.k) * (z - V(b.mean)) - V(b.centre);
}

// ---- divergence term of a soft teacher ------------------------------------------------------------
//
// For every Divergence D(p, q) between p = p_T (student) and q (teacher) the kernels sum two
// per-entry values: d_j, with Σ_j d_j = D, and π_j = p_j·∂D/∂p_j (∂D/∂p up to a constant, which
// cancels). Through the softmax, ∂D/∂h_j = (π_j − p_j·Σ_i π_i)/T. With m a mixture of the form:
//
//   form              d_j                                         π_j
//   forward KL        q·(log q − log p)                           −q
//   reverse KL        p·(log p − log q)                           p·(log p − log q)
//   mixed KL (w)      w·[forward]_j + (1 − w)·[reverse]_j         −w·q + (1 − w)·[reverse]_j
//   JSD (β)           β·q·log(q/m) + (1 − β)·p·log(p/m)           (1 − β)·p·log(p/m),  m = β·q + (1 − β)·p
//   TVD               ½·|p − q|                                   ½·p·sign(p − q), sign(0) = 0
//   skew forward (α)  q·log(q/m)                                  −(1 − α)·p·q/m,      m = α·q + (1 − α)·p
//   skew reverse (α)  p·log(p/m)                                  p·(log(p/m) − α·p/m), m = α·p + (1 − α)·q
//
// Every x·log(x/y) term is 0 where x == 0 (masked, or underflowed from a finite logit), chosen by a
// select before its difference of logs is used, so no 0·(−inf) or (−inf) − (−inf) reaches a sum;
// x > 0 where y's log is −inf gives +inf (a support violation: the row's loss is +inf). The logs
// come from the logits' log-arguments, not from log(p): an underflowed p keeps its finite log.
// A NaN in p, q or their logs reaches d or π in at least one entry of the row, so the row's Σd and
// Σπ, hence its loss and every gradient entry, are NaN.

//: the form's weight w (w·x + (1 − w)·y mixtures, mixed KL's forward weight)
template <typename acc_t>
struct DivergenceWeights {
  acc_t w = 0, rest = 1;  // w, 1 − w
};

template <typename acc_t>
KDFAST_HOST_DEVICE DivergenceWeights<acc_t> divergence_weights(int form, double param) {
  DivergenceWeights<acc_t> k;
  if (form == kDivMixedKL || form == kDivJSD || form == kDivSkewForwardKL || form == kDivSkewReverseKL) {
    k = {acc_t(param), acc_t(1 - param)};  // the glue keeps param strictly inside (0, 1)
  }
  return k;
}

// The mixture m = w·x + (1 − w)·y, formed from x and y themselves: the same value as
// exp(logaddexp(log w + log x, log(1 − w) + log y)) to a few ulp wherever m is a normal number, for
// one log per entry instead of an exp, a log1p and a division. Where m is subnormal or 0 (both x and
// y underflowed or masked) every term that uses it is weighted by x or y ≤ m/min(w, 1 − w), so it
// is below the accumulation's resolution, or is dropped by its x == 0 select.
template <typename V, typename acc_t>
KDFAST_HOST_DEVICE V mixture(const DivergenceWeights<acc_t>& k, const V& x, const V& y) {
  return V(k.w) * x + V(k.rest) * y;
}

template <typename V>
struct DivergenceEntry {
  V d, pi;
};

//: d_j and π_j of the form kForm (a Divergence code) at one entry, or one vector of entries
template <int kForm, typename V, typename acc_t>
KDFAST_HOST_DEVICE DivergenceEntry<V> divergence_entry(const DivergenceWeights<acc_t>& k, const V& p, const V& q,
                                                       const V& log_p, const V& log_q) {
  if constexpr (kForm == kDivForwardKL) {
    return {zero_where_zero(q, q * (log_q - log_p)), V(0) - q};
  } else if constexpr (kForm == kDivReverseKL) {
    const V reverse = zero_where_zero(p, p * (log_p - log_q));
    return {reverse, reverse};
  } else if constexpr (kForm == kDivMixedKL) {
    const V forward = zero_where_zero(q, q * (log_q - log_p));
    const V reverse = V(k.rest) * zero_where_zero(p, p * (log_p - log_q));
    return {V(k.w) * forward + reverse, reverse - V(k.w) * q};
  } else if constexpr (kForm == kDivJSD) {
    const V log_m = log_of(mixture(k, q, p));  // m = β·q + (1 − β)·p
    const V student_part = V(k.rest) * zero_where_zero(p, p * (log_p - log_m));
    return {V(k.w) * zero_where_zero(q, q * (log_q - log_m)) + student_part, student_part};
  } else if constexpr (kForm == kDivTVD) {
    // the sign from comparisons, not from p − q, which a compiler may contract into an fma with one
    // side unrounded (nonzero at a tie); neither greater nor equal: a NaN, kept
    const V sign = select_greater(p, q, V(1), select_greater(q, p, V(-1), select_equal(p, q, V(0), p + q)));
    return {V(0.5) * abs_of(p - q), V(0.5) * p * sign};
  } else if constexpr (kForm == kDivSkewForwardKL) {
    const V m = mixture(k, q, p);  // α·q + (1 − α)·p
    const V terms = zero_where_zero(q, q * (log_q - log_of(m)));
    return {terms, V(0) - zero_where_zero(q, q * (V(k.rest) * p / m))};
  } else {
    static_assert(kForm == kDivSkewReverseKL, "unknown divergence form");
    const V m = mixture(k, p, q);  // α·p + (1 − α)·q
    const V log_ratio = log_p - log_of(m);
    return {zero_where_zero(p, p * log_ratio), zero_where_zero(p, p * (log_ratio - V(k.w) * p / m))};
  }
}

//: the same with the form chosen at run time (uniform over a call, so no divergence between lanes)
template <typename V, typename acc_t>
KDFAST_HOST_DEVICE DivergenceEntry<V> divergence_entry(int form, const DivergenceWeights<acc_t>& k, const V& p,
                                                       const V& q, const V& log_p, const V& log_q) {
  switch (form) {
    case kDivReverseKL: return divergence_entry<kDivReverseKL>(k, p, q, log_p, log_q);
    case kDivMixedKL: return divergence_entry<kDivMixedKL>(k, p, q, log_p, log_q);
    case kDivJSD: return divergence_entry<kDivJSD>(k, p, q, log_p, log_q);
    case kDivTVD: return divergence_entry<kDivTVD>(k, p, q, log_p, log_q);
    case kDivSkewForwardKL: return divergence_entry<kDivSkewForwardKL>(k, p, q, log_p, log_q);
    case kDivSkewReverseKL: return divergence_entry<kDivSkewReverseKL>(k, p, q, log_p, log_q);
    default: return divergence_entry<kDivForwardKL>(k, p, q, log_p, log_q);
  }
}

// ---- row-softmax loss and gradient coefficients --------------------------------------------------

template <typename acc_t>
struct RowSoftmaxScalars {
  acc_t temperature, kappa, eps, kl_weight, ce_weight, uniform_weight, reweight_alpha, reweight_eps;
};

template <typename acc_t>
KDFAST_HOST_DEVICE RowSoftmaxScalars<acc_t> row_softmax_scalars(const RowSoftmaxArgs& a) {
  return {acc_t(a.temperature), acc_t(a.multiplier), acc_t(a.eps), acc_t(a.kl_weight), acc_t(a.ce_weight),
          acc_t(a.uniform_weight), acc_t(a.reweight_alpha), acc_t(a.reweight_eps)};
}

// What a kernel gathers from one row before the coefficients: all sums of exps are shifted by the
// raw row max of their set (exp_shift of it for the partial teacher's set c ≠ y), and their
// log-arguments are scale/T·(z − max) for p_T, scale·(z − max) for p and (z^t − max)/T for a raw
// teacher. Fields a call's flags do not need may stay at their defaults.
template <typename acc_t>
struct RowSums {
  acc_t student_max = 0, student_sum = 0;  // raw max z and Σz of the student row
  acc_t student_label = 0;                 // raw z_y (when a label is read)
  acc_t student_exp = 1;                   // Zs = Σ exp(scale/T·(z − max))       (KL term)
  acc_t teacher_exp = 1;                   // Zt = Σ exp(scale_t/T·(z^t − max^t)) (soft teacher)
  acc_t kl_weighted = 0;                   // Σ kl_entry(e^t, l^t − l^s)/Zt in nats (soft teacher, forward KL)
  acc_t divergence = 0;                    // Σ d_j   (soft teacher, general_divergence)
  acc_t divergence_pi = 0;                 // Σ π_j   (soft teacher, general_divergence)
  acc_t unit_exp = 1;                      // Z1 = Σ exp(scale·(z − max))          (CE/uniform, unless shared)
  acc_t teacher_label = 0;                 // raw z^t_y                            (partial teacher, re-weighting)
  acc_t rest_max = 0;                      // max_{c≠y} z^t_c                      (partial teacher)
  acc_t rest_exp = 0;                      // Σ_{c≠y} exp((z^t_c − exp_shift(rest_max))/T)
  acc_t raw_teacher_max = 0;               // max z^t                              (re-weighting)
  acc_t raw_teacher_exp = 1;               // Σ exp((z^t − max z^t)/T)             (re-weighting)
};

// ℓ and ∂ℓ/∂h_c = k0 + cs·e^s_c − ct·e^t_c + c1·e^1_c + [c = y]·at_label, with e^s, e^t, e^1 the
// unnormalised exps of p_T, q and p (the sums' numerators).
template <typename acc_t>
struct RowCoefficients {
  acc_t loss = 0;
  acc_t cs = 0, ct = 0, c1 = 0, k0 = 0, at_label = 0;
};

// The row's loss and gradient coefficients (h = the normalised student logits, p_T = softmax(h/T),
// p = softmax(h)):
//   ℓ = kl_w·KL(q ‖ p_T) + ce_w·w·(−log p_y) + u_w·(−mean_c log p_c)
//   ∂ℓ/∂h = kl_w/T·(p_T − q) + ce_w·w·(p − e_y) + u_w·(p − 1/C)
// soft teacher:    KL = Σ q·(l^t − l^s) + log(Zs/Zt), the first term being sums.kl_weighted;
//                  another divergence: ℓ gets kl_w·Σd, and ∂/∂h = kl_w/T·(π − p_T·Σπ) is this form
//                  with the teacher's exp row replaced by π (ct = −kl_w/T, cs = −kl_w/T·Σπ/Zs)
// partial teacher: q_y = ρ = σ_T(z^t)_y, q_c = (1 − ρ)/(C − 1) elsewhere; log(1 − ρ) comes from the
//                  log-sum-exp over c ≠ y, never from 1 − ρ, so it stays accurate as ρ → 1
// re-weighting:    detached w = 1 − α·(1 − ρ)/max(1 − p_y, eps), ρ from the raw teacher at T
template <typename acc_t>
KDFAST_HOST_DEVICE RowCoefficients<acc_t> row_coefficients(const RowSoftmaxFlags& f, const RowSoftmaxScalars<acc_t>& p,
                                                           const NormalisationMap<acc_t>& s, int64_t n,
                                                           const RowSums<acc_t>& sums) {
  RowCoefficients<acc_t> c;
  const acc_t inv_t = 1 / p.temperature;
  const acc_t scale_t = s.scale * inv_t;
  if (f.soft_teacher && f.general_divergence) {
    c.loss += p.kl_weight * sums.divergence;
    c.cs = -p.kl_weight * inv_t * sums.divergence_pi / sums.student_exp;
    c.ct = -p.kl_weight * inv_t;
  } else if (f.soft_teacher) {
    c.loss += p.kl_weight * (sums.kl_weighted + log_of(sums.student_exp / sums.teacher_exp));
    c.cs = p.kl_weight * inv_t / sums.student_exp;
    c.ct = p.kl_weight * inv_t / sums.teacher_exp;
  } else if (f.partial_teacher) {
    const acc_t teacher_max = max_keep_nan(sums.teacher_label, sums.rest_max);
    const acc_t log_true = (sums.teacher_label - teacher_max) * inv_t;
    const acc_t log_rest = n > 1 ? log_of(sums.rest_exp) + (exp_shift(sums.rest_max) - teacher_max) * inv_t
                                 : negative_infinity<acc_t>();
    const acc_t log_total = log_of(exp_of(log_true) + exp_of(log_rest));  // one of the two terms is exp(0)
    const acc_t log_rho = log_true - log_total, log_not_rho = log_rest - log_total;
    const acc_t rho = exp_of(log_rho), not_rho = exp_of(log_not_rho);
    const acc_t log_zs = log_of(sums.student_exp);
    const acc_t log_p_true = scale_t * (sums.student_label - sums.student_max) - log_zs;
    // the mean of log p over all classes, not their sum: n·(z − max) overflows before a mean does
    const acc_t mean_log_p = scale_t * (sums.student_sum / acc_t(n) - sums.student_max) - log_zs;
    acc_t kl = 0, q_other = 0;
    if (rho != 0) kl += rho * (log_rho - log_p_true);  // 0·log 0 = 0 (a NaN still counts)
    if (n > 1 && not_rho != 0) {
      const acc_t others = acc_t(n - 1);
      q_other = not_rho / others;
      // Σ_{c≠y} q_c·(log q_c − log p_c) with q_c = q_other
      kl += not_rho * (log_not_rho - log_of(others)) - (q_other * acc_t(n)) * mean_log_p + q_other * log_p_true;
    }
    c.loss += p.kl_weight * kl;
    c.cs = p.kl_weight * inv_t / sums.student_exp;
    c.k0 -= p.kl_weight * inv_t * q_other;
    c.at_label -= p.kl_weight * inv_t * (rho - q_other);
  }
  if (f.unit_softmax) {
    const acc_t unit_sum = f.share_unit ? sums.student_exp : sums.unit_exp;
    const acc_t log_unit = log_of(unit_sum);
    if (f.ce) {
      const acc_t nll = log_unit - s.scale * (sums.student_label - sums.student_max);
      acc_t weight = 1;
      if (f.reweight) {
        const acc_t rho = exp_of((sums.teacher_label - sums.raw_teacher_max) * inv_t) / sums.raw_teacher_exp;
        weight = 1 - p.reweight_alpha * (1 - rho) / clamp_below(1 - exp_of(-nll), p.reweight_eps);
      }
      c.loss += p.ce_weight * weight * nll;
      c.c1 += p.ce_weight * weight / unit_sum;
      c.at_label -= p.ce_weight * weight;
    }
    if (f.uniform) {
      // −mean_c log p_c = log Z1 − mean of the log-arguments
      c.loss += p.uniform_weight * (log_unit - s.scale * (sums.student_sum / acc_t(n) - sums.student_max));
      c.c1 += p.uniform_weight / unit_sum;
      c.k0 -= p.uniform_weight / acc_t(n);
    }
    if (f.share_unit) {  // p is p_T: one exp row
      c.cs += c.c1;
      c.c1 = 0;
    }
  }
  return c;
}

// ∂ℓ/∂h at one entry (or one vector of entries) from its exps (teacher_exp is π_j for a general
// divergence); kS, kT, k1 say which exp rows the call has (a missing one is never read), and the
// label's own term is added by the caller at y.
template <bool kS, bool kT, bool k1, typename V, typename acc_t>
KDFAST_HOST_DEVICE V logit_gradient(const RowCoefficients<acc_t>& c, const V& student_exp, const V& teacher_exp,
                                    const V& unit_exp) {
  V g(c.k0);
  if constexpr (kS) g = g + V(c.cs) * student_exp;
  if constexpr (kT) g = g - V(c.ct) * teacher_exp;
  if constexpr (k1) g = g + V(c.c1) * unit_exp;
  return g;
}

// ---- feature–centre (ND) ----------------------------------------------------------------------------

// ℓ = 1 − ⟨u, ê⟩/M with ê = c/max(‖c‖, eps), M = max(‖u‖, ‖f^t‖) clamped at eps (a tie takes ‖u‖,
// the cosine branch); ∂ℓ/∂u = kc·c + ku·u with kc = −1/(max(‖c‖, eps)·M) and
// ku = [M is ‖u‖, not clamped, u ≠ 0]·⟨u, ê⟩/(M²‖u‖). A NaN in u or f^t makes M, ℓ and every kc NaN.
template <typename acc_t>
struct CentreTerms {
  acc_t loss, kc, ku;
};

template <typename acc_t>
KDFAST_HOST_DEVICE CentreTerms<acc_t> feature_centre_terms(acc_t u_dot_centre, acc_t centre_squares,
                                                           acc_t u_squares, acc_t teacher_squares, acc_t eps) {
  const acc_t centre_norm = clamp_below(sqrt_of(centre_squares), eps);
  const acc_t u_norm = sqrt_of(u_squares), teacher_norm = sqrt_of(teacher_squares);
  const bool student_branch = !(u_norm < teacher_norm);
  const acc_t raw_scale = student_branch ? max_keep_nan(u_norm, teacher_norm) : teacher_norm;
  const acc_t scale = clamp_below(raw_scale, eps);
  const acc_t cosine_part = u_dot_centre / centre_norm;  // ⟨u, ê⟩
  const bool through_norm = student_branch && raw_scale >= eps && u_norm > 0;
  return {1 - cosine_part / scale, -1 / (centre_norm * scale),
          through_norm ? cosine_part / (scale * scale * u_norm) : acc_t(0)};
}

template <typename V, typename acc_t>
KDFAST_HOST_DEVICE V feature_centre_gradient(const CentreTerms<acc_t>& t, const V& centre, const V& u) {
  return V(t.kc) * centre + V(t.ku) * u;
}

// ---- landmark Gram (KDA / Nyström) --------------------------------------------------------------------

// One entry of the residual R = S^s − S^t: its loss and G = ∂ℓ/∂R.
//   smooth_l1: huber_β(r) = r²/(2β) if |r| < β else |r| − β/2, G = clip(r/β, −1, 1)
//   squared:   r², G = 2r
// G is r/|r| rather than a sign select above β, so a NaN residual stays NaN.
template <typename acc_t>
struct GramEntry {
  acc_t loss, grad;
};

template <typename acc_t>
KDFAST_HOST_DEVICE GramEntry<acc_t> gram_entry(int kind, acc_t r, acc_t beta) {
  if (kind == kGramSmoothL1) {
    const acc_t size = r < 0 ? -r : r;
    if (size < beta) return {acc_t(0.5) * r * r / beta, r / beta};
    return {size - acc_t(0.5) * beta, r / size};
  }
  return {r * r, 2 * r};
}

}  // namespace kdfast::row_math
