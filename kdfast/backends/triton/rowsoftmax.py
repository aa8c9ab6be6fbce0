"""Row-softmax family in Triton: KD, SKD (layernorm / l2 / standardize), CE, KD-pt, label
smoothing, re-weighted CE and ignore_index as compile-time modes of one kernel; the loss and the
gradient come out of the same launch. The per-row math is the contract's
(:mod:`kdfast.backends._contract`), in stages of the same names:

    normalisation_map       h = scale·(z − μ) from the row statistics, and its backward factors c1, c2
    exp_shift               m, or 0 when m = −inf; log softmax(h/T) = (h − m)/T − log Σ exp((h − m)/T)
    partial_teacher_logs    log ρ and log q_other of the partial teacher
    kl_entry                q·(log q − log p), 0 where q == 0
    divergence_entry        (d_j, π_j) of the other divergence forms (reverse / mixed KL, JSD, TVD, skew KLs)
    row_coefficients        ∂ℓ/∂h = kl_coef·(p_T − q) + ce_coef·(p − e_y) + u_coef·(p − 1/C)
    logit_gradient          that line per entry
    normalisation_backward  ∂ℓ/∂z = scale·(g − c1·mean g) − scale·c2·Σ g(z − μ)·(z − μ), only when normalising

Exponentials are taken of (h − m)·(1/T), never of h/T, so a large logit at a small temperature does
not overflow. One program per row: a row that fits in one block is loaded once and kept in
registers; a longer row is streamed in up to five passes (statistics, online sums of
exponentials, Σπ of a divergence other than forward KL, the two sums the normalisation's backward
needs, the gradient store).

A divergence other than forward KL (the DIVERGENCE constexpr) replaces the KL term of a softmax
teacher: its loss is kl_w·Σ d_j and its logit gradient kl_w/T·(π − p_T·Σπ). Forward KL keeps the
kl_entry / (p_T − q) path.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._contract import DIVERGENCE_CODES, NORMALIZE_CODES, TEACHER_CODES, RowSoftmaxParams
from ._common import (acc_zero, accumulate_dtype, gradient_output, kernel_op, launch, row_block, row_warps, skip_row,
                      upcast)

NORM_NONE: tl.constexpr = tl.constexpr(NORMALIZE_CODES["none"])
NORM_LAYERNORM: tl.constexpr = tl.constexpr(NORMALIZE_CODES["layernorm"])
NORM_L2: tl.constexpr = tl.constexpr(NORMALIZE_CODES["l2"])
NORM_STANDARDIZE: tl.constexpr = tl.constexpr(NORMALIZE_CODES["standardize"])
TEACHER_NONE: tl.constexpr = tl.constexpr(TEACHER_CODES["none"])
TEACHER_SOFTMAX: tl.constexpr = tl.constexpr(TEACHER_CODES["softmax"])
TEACHER_PARTIAL: tl.constexpr = tl.constexpr(TEACHER_CODES["partial"])
DIV_FORWARD_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["forward_kl"])
DIV_REVERSE_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["reverse_kl"])
DIV_MIXED_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["mixed_kl"])
DIV_JSD: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["jsd"])
DIV_TVD: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["tvd"])
DIV_SKEW_FORWARD_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["skew_forward_kl"])
DIV_SKEW_REVERSE_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["skew_reverse_kl"])
#: the smallest normal of each compute dtype: standardize clamps var there before the square root
TINY_FP32: tl.constexpr = tl.constexpr(torch.finfo(torch.float32).tiny)
TINY_FP64: tl.constexpr = tl.constexpr(torch.finfo(torch.float64).tiny)


@triton.jit
def row_moments(x, mask):
    """(count, mean, M2 = Σ(x − mean)²) of the lanes in ``mask``, two-pass inside the block."""
    n = tl.sum(mask.to(x.dtype), axis=0)
    mean = tl.sum(tl.where(mask, x, 0.0), axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    return n, mean, tl.sum(d * d, axis=0)


@triton.jit
def merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries; n_a = 0 is allowed."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / n
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def normalisation_map(mean, m2, num_classes, kappa, eps, NORM: tl.constexpr, FP64: tl.constexpr):
    """(μ, scale, c1, c2): h = scale·(z − μ) and its backward factors (see the module docstring)."""
    zero = mean * 0.0
    if NORM == NORM_LAYERNORM:
        # SKD: κ·(z − μ)/√(var + ε), biased var
        var_eps = m2 / num_classes + eps
        return mean, kappa / tl.sqrt(var_eps), zero + 1.0, 1.0 / (num_classes * var_eps)
    elif NORM == NORM_L2:
        # κ·z/max(‖z‖, ε); the clamp has zero slope
        norm = tl.sqrt(m2 + num_classes * mean * mean)
        clamped = tl.maximum(norm, eps, propagate_nan=tl.PropagateNan.ALL)
        c2 = tl.where(norm > eps, 1.0 / (clamped * clamped), 0.0)
        return zero, kappa / clamped, zero, c2
    elif NORM == NORM_STANDARDIZE:
        # κ·(z − μ)/(σ + ε), unbiased σ = √max(var, tiny); the clamp has zero slope
        tiny = TINY_FP32
        if FP64:
            tiny = TINY_FP64
        var = m2 / tl.maximum(num_classes - 1.0, 1.0)
        std = tl.sqrt(tl.maximum(var, tiny, propagate_nan=tl.PropagateNan.ALL))
        c2 = tl.where(var > tiny, 1.0 / (tl.maximum(num_classes - 1.0, 1.0) * std * (std + eps)), 0.0)
        return mean, kappa / (std + eps), zero + 1.0, c2
    else:
        return zero, zero + 1.0, zero, zero


@triton.jit
def exp_shift(m):
    """The shift of a set's exponentials: its max, or 0 when the max is −inf (an all-masked set,
    whose sum of exponentials is then 0 and whose log is −inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def exp_sum_update(l, m_old, m_new, x, inv_t):
    """Σ exp((x − shift)·inv_t) over the block (masked lanes hold −inf) added to the running sum l
    taken at m_old's shift, all at the shift of m_new. An all-masked history (m_old = −inf, l = 0)
    stays 0."""
    shift = exp_shift(m_new)
    return l * tl.exp((m_old - shift) * inv_t) + tl.sum(tl.exp((x - shift) * inv_t), axis=0)


@triton.jit
def partial_teacher_logs(zt_y, m_t, log_zt, m_o, l_o, inv_t, num_classes, PARTIAL: tl.constexpr):
    """(log ρ, log q_other) from the raw teacher at T: (m_t, log_zt) the teacher's max and log sum of
    exponentials, (m_o, l_o) the max and sum over the classes c ≠ y (read only for the partial
    teacher; the re-weighting needs ρ alone)."""
    log_rho = (zt_y - exp_shift(m_t)) * inv_t - log_zt
    log_other = log_rho * 0.0
    if PARTIAL:
        # every c ≠ y masked (or C = 1): q_other = 0 exactly, whatever the teacher's own shift
        log_rest = tl.where(l_o == 0, float("-inf"),
                            (exp_shift(m_o) - exp_shift(m_t)) * inv_t + tl.log(tl.where(l_o == 0, 1.0, l_o)) - log_zt)
        log_other = log_rest - tl.log(tl.maximum(num_classes - 1.0, 1.0))
    return log_rho, log_other


@triton.jit
def kl_entry(q, log_q, log_p):
    """q·(log q − log p), 0·log 0 = 0 only at q == 0 exactly (a NaN stays NaN; log p = −inf where
    q > 0 gives +inf)."""
    return tl.where(q == 0, 0.0, q * (tl.where(q == 0, 0.0, log_q) - log_p))


@triton.jit
def x_log_ratio(x, log_x, log_y):
    """x·(log x − log y) with both logs replaced by 0 where x == 0 before the difference is formed,
    so an absent x never meets log y = −inf (no 0·inf, no −inf − (−inf)); x > 0 with log y = −inf
    gives +inf, a NaN stays NaN."""
    absent = x == 0
    return tl.where(absent, 0.0, x * (tl.where(absent, 0.0, log_x) - tl.where(absent, 0.0, log_y)))


@triton.jit
def log_mixture(log_x, log_y, w):
    """log(w·x + (1 − w)·y) = logaddexp(log w + log x, log(1 − w) + log y) for 0 < w < 1, shifted by
    the larger operand; −inf (not NaN) where x = y = 0, since exp_shift then shifts by 0."""
    a = tl.log(w) + log_x
    b = tl.log(1.0 - w) + log_y
    shift = exp_shift(tl.maximum(a, b))
    return shift + tl.log(tl.exp(a - shift) + tl.exp(b - shift))


@triton.jit
def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^−|x|), with log1p by Goldberg's correction (no libdevice):
    log(v)·u/(v − 1) for v = 1 + u undoes the rounding of v, and v == 1 means log1p(u) = u."""
    u = tl.exp(-tl.abs(x))
    v = 1.0 + u
    log1p_u = tl.where(v == 1.0, u, tl.log(v) * (u / tl.where(v == 1.0, 1.0, v - 1.0)))
    return tl.maximum(x, 0.0) + log1p_u


@triton.jit
def mixture_logit(p, log_p, log_q, log_ratio_w):
    """x = log(w/(1 − w)) + log q − log p, the log of the mixture's q part over its p part (−inf
    where q == 0); the logs are zeroed where p == 0 first, the caller drops those entries."""
    absent = p == 0
    return log_ratio_w + tl.where(absent, 0.0, log_q) - tl.where(absent, 0.0, log_p)


@triton.jit
def divergence_entry(p, q, log_p, log_q, weight, DIVERGENCE: tl.constexpr):
    """(d, π) of one entry: the loss term and p·∂D/∂p (the gradient is (π − p·Σπ)/T); ``weight`` is
    the form's w, β or α in the compute dtype. Terms x·log(x/·) vanish where x == 0.

    π may move by c·p for any constant c (it cancels in π − p·Σπ); JSD and the skew reverse KL
    take the c that makes π vanish where the teacher is negligible, so that a saturated row (p and
    q one-hot on different classes) does not subtract O(1) terms into a gradient of O(1e-7)."""
    if DIVERGENCE == DIV_REVERSE_KL:
        d = x_log_ratio(p, log_p, log_q)
        pi = d
    elif DIVERGENCE == DIV_MIXED_KL:
        rkl = x_log_ratio(p, log_p, log_q)
        d = weight * x_log_ratio(q, log_q, log_p) + (1.0 - weight) * rkl
        pi = (1.0 - weight) * rkl - weight * q
    elif DIVERGENCE == DIV_JSD:
        log_m = log_mixture(log_q, log_p, weight)  # β weighs the teacher
        d = weight * x_log_ratio(q, log_q, log_m) + (1.0 - weight) * x_log_ratio(p, log_p, log_m)
        # (1 − β)·p·log(p/m) shifted by c = (1 − β)·log(1 − β): −(1 − β)·p·log(1 + β·q/((1 − β)·p))
        x = mixture_logit(p, log_p, log_q, tl.log(weight) - tl.log(1.0 - weight))
        pi = -(1.0 - weight) * tl.where(p == 0, 0.0, p * softplus(x))
    elif DIVERGENCE == DIV_TVD:
        diff = p - q
        # sign with sign(0) = 0; diff·0 keeps a NaN (the comparisons alone would drop it)
        sign = tl.where(diff > 0, 1.0, 0.0) - tl.where(diff < 0, 1.0, 0.0) + diff * 0.0
        d = 0.5 * tl.abs(diff)
        pi = 0.5 * p * sign
    elif DIVERGENCE == DIV_SKEW_FORWARD_KL:
        log_m = log_mixture(log_q, log_p, weight)  # m = α·q + (1 − α)·p ≥ α·q: no support violation
        d = x_log_ratio(q, log_q, log_m)
        # p·q/m as p·exp(log q − log m), its operands zeroed where q == 0 (m may be 0 there)
        absent = q == 0
        pi = -(1.0 - weight) * tl.where(absent, 0.0, p * tl.exp(tl.where(absent, 0.0, log_q)
                                                                 - tl.where(absent, 0.0, log_m)))
    elif DIVERGENCE == DIV_SKEW_REVERSE_KL:
        log_m = log_mixture(log_p, log_q, weight)  # m = α·p + (1 − α)·q ≥ α·p
        d = x_log_ratio(p, log_p, log_m)
        # p·(log(p/m) − α·p/m) shifted by c = −(1 + log α): with s = α·p/m, p·(log s + 1 − s),
        # where 1 − s = σ(x) and log s = −softplus(x) for x = log((1 − α)/α) + log q − log p
        x = mixture_logit(p, log_p, log_q, tl.log(1.0 - weight) - tl.log(weight))
        pi = tl.where(p == 0, 0.0, p * (tl.sigmoid(x) - softplus(x)))
    else:
        d = kl_entry(q, log_q, log_p)
        pi = -q
    return d, pi


@triton.jit
def row_coefficients(kl_w, ce_w, u_w, w, inv_t):
    """(kl_coef, ce_coef, u_coef) of ∂ℓ/∂h = kl_coef·(p_T − q) + ce_coef·(p − e_y) + u_coef·(p − 1/C)
    (each bracket is computed as it stands: exactly 0 where p = e_y or p is uniform)."""
    return kl_w * inv_t, ce_w * w, u_w + w * 0.0


@triton.jit
def logit_gradient(p_t, q, p, is_y, inv_c, kl_coef, ce_coef, u_coef, poison, HAS_KL: tl.constexpr,
                   HAS_CE: tl.constexpr, HAS_UNIFORM: tl.constexpr):
    """∂ℓ/∂h per entry from the row coefficients (plus ``poison``: 0, or NaN for a NaN row)."""
    g = p * 0.0 + poison
    if HAS_KL:
        g += kl_coef * (p_t - q)
    if HAS_CE:
        g += ce_coef * (p - tl.where(is_y, 1.0, 0.0))
    if HAS_UNIFORM:
        g += u_coef * (p - inv_c)
    return g


@triton.jit
def normalisation_backward(g, zc, scale, c1, c2, sum_g, sum_gz, inv_c):
    """∂ℓ/∂z = scale·(g − c1·mean g) − scale·c2·Σ g(z − μ)·(z − μ) (zc = z − μ)."""
    return scale * (g - c1 * sum_g * inv_c) - (scale * c2 * sum_gz) * zc


@triton.jit
def _load_row_block(base, cols, mask, stride, FP64: tl.constexpr):
    return upcast(tl.load(base + cols.to(tl.int64) * stride, mask=mask, other=0.0), FP64)


@triton.jit
def _block_exp_sums(hs, ht, cols, mask, y, inv_t, m_s, l_st, l_s1, m_t, l_t, m_o, l_o, nan_t,
                    HAS_KL: tl.constexpr, NEED_P: tl.constexpr, NEED_Q: tl.constexpr, PARTIAL: tl.constexpr,
                    CHECK_T: tl.constexpr):
    """One block folded into the row's running maxima and sums of exponentials: student at T and
    at 1 (one max), teacher at T, and (partial teacher) the teacher over c ≠ y; ``nan_t`` counts
    the teacher's NaNs when no term reads the teacher (a NaN there still poisons the row)."""
    hs = tl.where(mask, hs, float("-inf"))
    m_new = tl.maximum(m_s, tl.max(hs, axis=0))
    if HAS_KL:
        l_st = exp_sum_update(l_st, m_s, m_new, hs, inv_t)
    if NEED_P:
        l_s1 = exp_sum_update(l_s1, m_s, m_new, hs, 1.0)
    if NEED_Q:
        ht_m = tl.where(mask, ht, float("-inf"))
        m_t_new = tl.maximum(m_t, tl.max(ht_m, axis=0))
        l_t = exp_sum_update(l_t, m_t, m_t_new, ht_m, inv_t)
        m_t = m_t_new
        if PARTIAL:
            ho = tl.where(cols != y, ht_m, float("-inf"))
            m_o_new = tl.maximum(m_o, tl.max(ho, axis=0))
            l_o = exp_sum_update(l_o, m_o, m_o_new, ho, inv_t)
            m_o = m_o_new
    if CHECK_T:
        nan_t += tl.sum(tl.where(mask & (ht != ht), 1.0, 0.0), axis=0)
    return m_new, l_st, l_s1, m_t, l_t, m_o, l_o, nan_t


@triton.jit
def _block_pi_sum(hs, ht, mask, inv_t, shift_s, log_zst, shift_t, log_zt, div_w, DIVERGENCE: tl.constexpr):
    """Σπ over the block (softmax teacher): the streamed path needs the row's Σπ before its gradient."""
    log_pt = (hs - shift_s) * inv_t - log_zst
    log_q = (ht - shift_t) * inv_t - log_zt
    _, pi = divergence_entry(tl.exp(log_pt), tl.exp(log_q), log_pt, log_q, div_w, DIVERGENCE)
    return tl.sum(tl.where(mask, pi, 0.0), axis=0)


@triton.jit
def _block_terms(hs, ht, cols, mask, y, inv_t, inv_c, shift_s, log_zst, log_zs1, shift_t, log_zt, log_rho, log_other,
                 kl_coef, ce_coef, u_coef, poison, div_w, sum_pi, TEACHER: tl.constexpr, HAS_CE: tl.constexpr,
                 HAS_UNIFORM: tl.constexpr, DIVERGENCE: tl.constexpr, WHOLE_ROW: tl.constexpr):
    """(∂ℓ/∂h on the block, the block's Σ kl_entry or Σ d); masked lanes get 0. ``sum_pi`` is the
    row's Σπ of a divergence other than forward KL, taken from the block itself when WHOLE_ROW."""
    is_y = cols == y
    p_t = hs * 0.0
    q = p_t
    kl = tl.sum(p_t, axis=0)
    if TEACHER != TEACHER_NONE:
        log_pt = (hs - shift_s) * inv_t - log_zst
        if TEACHER == TEACHER_SOFTMAX:
            log_q = (ht - shift_t) * inv_t - log_zt
        else:
            log_q = tl.where(is_y, log_rho, log_other)
        q = tl.exp(log_q)
        p_t = tl.exp(log_pt)
        if DIVERGENCE == DIV_FORWARD_KL:
            kl = tl.sum(tl.where(mask, kl_entry(q, log_q, log_pt), 0.0), axis=0)
        else:
            d, pi = divergence_entry(p_t, q, log_pt, log_q, div_w, DIVERGENCE)
            pi = tl.where(mask, pi, 0.0)
            kl = tl.sum(tl.where(mask, d, 0.0), axis=0)
            if WHOLE_ROW:
                sum_pi = tl.sum(pi, axis=0)
    p = p_t
    if HAS_CE or HAS_UNIFORM:
        p = tl.exp((hs - shift_s) - log_zs1)
    # logit_gradient's KL bracket (a − b): p_T − q for forward KL, π − p_T·Σπ for the other forms
    kl_a = p_t
    kl_b = q
    if DIVERGENCE != DIV_FORWARD_KL:
        kl_a = pi
        kl_b = p_t * sum_pi
    g = logit_gradient(kl_a, kl_b, p, is_y, inv_c, kl_coef, ce_coef, u_coef, poison, TEACHER != TEACHER_NONE, HAS_CE,
                       HAS_UNIFORM)
    return tl.where(mask, g, 0.0), kl


@triton.jit
def _row_softmax_kernel(
    S, T, Y, LOSS, GRAD,
    C, num_classes, s_row, s_col, t_row, t_col, y_stride, g_row,
    kappa, eps, inv_t, kl_w, ce_w, u_w, rw_alpha, rw_eps, ignore_index, div_param,
    NORM: tl.constexpr, NORM_T: tl.constexpr, TEACHER: tl.constexpr, HAS_CE: tl.constexpr,
    HAS_UNIFORM: tl.constexpr, REWEIGHT: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_TEACHER: tl.constexpr,
    FP64: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD: tl.constexpr,
    DIVERGENCE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 row offsets: N·C may exceed 2^31
    s_base = S + row * s_row
    t_base = T + row * t_row
    g_base = GRAD + row * g_row
    lanes = tl.arange(0, BLOCK)
    HAS_KL: tl.constexpr = TEACHER != TEACHER_NONE
    NEED_P: tl.constexpr = HAS_CE or HAS_UNIFORM or REWEIGHT         # softmax(h^s) at T = 1
    NEED_Q: tl.constexpr = HAS_KL or REWEIGHT                        # the teacher's exponentials
    CHECK_T: tl.constexpr = HAS_TEACHER and not NEED_Q               # read only to poison a NaN row
    NORMALISED: tl.constexpr = NORM != NORM_NONE

    y = row * 0
    if HAS_TARGET:
        y = tl.load(Y + row * y_stride).to(tl.int64)
        if skip_row(y, ignore_index, C, g_base, LOSS + row, C, FP64, BLOCK, HAS_GRAD):
            return

    zero = acc_zero(FP64)
    # ---- row statistics → the normalisation maps (student; teacher when it is normalised too)
    mean_s = zero
    m2_s = zero
    mean_t = zero
    m2_t = zero
    if SINGLE:
        mask = lanes < C
        zs = _load_row_block(s_base, lanes, mask, s_col, FP64)
        zt = zs
        if HAS_TEACHER:
            zt = _load_row_block(t_base, lanes, mask, t_col, FP64)
        if NORMALISED:
            _, mean_s, m2_s = row_moments(zs, mask)
        if NORM_T != NORM_NONE:
            _, mean_t, m2_t = row_moments(zt, mask)
    elif NORMALISED:
        n_s = zero
        n_t = zero
        for start in range(0, C, BLOCK):
            cols = start + lanes
            mask = cols < C
            nb, mb, m2b = row_moments(_load_row_block(s_base, cols, mask, s_col, FP64), mask)
            n_s, mean_s, m2_s = merge_moments(n_s, mean_s, m2_s, nb, mb, m2b)
            if NORM_T != NORM_NONE:
                nb, mb, m2b = row_moments(_load_row_block(t_base, cols, mask, t_col, FP64), mask)
                n_t, mean_t, m2_t = merge_moments(n_t, mean_t, m2_t, nb, mb, m2b)
    mu_s, a_s, c1, c2 = normalisation_map(mean_s, m2_s, num_classes, kappa, eps, NORM, FP64)
    mu_t, a_t, _, _ = normalisation_map(mean_t, m2_t, num_classes, kappa, eps, NORM_T, FP64)

    # ---- maxima and sums of exponentials
    m_s = zero + float("-inf")
    m_t = m_s
    m_o = m_s
    l_st = zero
    l_s1 = zero
    l_t = zero
    l_o = zero
    nan_t = zero
    if SINGLE:
        hs = a_s * (zs - mu_s)
        ht = a_t * (zt - mu_t)
        m_s, l_st, l_s1, m_t, l_t, m_o, l_o, nan_t = _block_exp_sums(
            hs, ht, lanes, mask, y, inv_t, m_s, l_st, l_s1, m_t, l_t, m_o, l_o, nan_t,
            HAS_KL, NEED_P, NEED_Q, TEACHER == TEACHER_PARTIAL, CHECK_T)
    else:
        for start in range(0, C, BLOCK):
            cols = start + lanes
            mask = cols < C
            hs = a_s * (_load_row_block(s_base, cols, mask, s_col, FP64) - mu_s)
            ht = hs
            if HAS_TEACHER:
                ht = a_t * (_load_row_block(t_base, cols, mask, t_col, FP64) - mu_t)
            m_s, l_st, l_s1, m_t, l_t, m_o, l_o, nan_t = _block_exp_sums(
                hs, ht, cols, mask, y, inv_t, m_s, l_st, l_s1, m_t, l_t, m_o, l_o, nan_t,
                HAS_KL, NEED_P, NEED_Q, TEACHER == TEACHER_PARTIAL, CHECK_T)
    shift_s = exp_shift(m_s)
    shift_t = exp_shift(m_t)
    log_zst = zero
    log_zs1 = zero
    log_zt = zero
    if HAS_KL:
        log_zst = tl.log(l_st)
    if NEED_P:
        log_zs1 = tl.log(l_s1)
    if NEED_Q:
        log_zt = tl.log(l_t)

    # ---- row scalars at the label: the CE term, the partial teacher, the re-weighting
    hs_y = zero
    log_rho = zero
    log_other = zero
    w = zero + 1.0
    if HAS_CE or REWEIGHT:
        hs_y = a_s * (upcast(tl.load(s_base + y * s_col), FP64) - mu_s)
    if TEACHER == TEACHER_PARTIAL or REWEIGHT:
        # the raw teacher at T (NORM_T is none in these modes)
        log_rho, log_other = partial_teacher_logs(upcast(tl.load(t_base + y * t_col), FP64), m_t, log_zt, m_o,
                                                  l_o, inv_t, num_classes, TEACHER == TEACHER_PARTIAL)
    if REWEIGHT:
        one_minus_p = 1.0 - tl.exp(hs_y - shift_s - log_zs1)
        w = 1.0 - rw_alpha * (1.0 - tl.exp(log_rho)) / tl.maximum(one_minus_p, rw_eps,
                                                                  propagate_nan=tl.PropagateNan.ALL)
    inv_c = 1.0 / num_classes
    kl_coef, ce_coef, u_coef = row_coefficients(kl_w, ce_w, u_w, w, inv_t)
    poison = tl.where(nan_t > 0, float("nan"), 0.0)  # only CHECK_T sets nan_t
    div_w = div_param + zero  # in the compute dtype: log w and the weights of a form agree in fp64
    IS_DIV: tl.constexpr = DIVERGENCE != DIV_FORWARD_KL   # kernel_meta sets it for a softmax teacher only

    # ---- gradient and loss
    sum_g = zero
    sum_gz = zero
    kl = zero
    sum_hs = zero
    if SINGLE:
        g, kl = _block_terms(hs, ht, lanes, mask, y, inv_t, inv_c, shift_s, log_zst, log_zs1, shift_t, log_zt, log_rho,
                             log_other, kl_coef, ce_coef, u_coef, poison, div_w, zero, TEACHER, HAS_CE, HAS_UNIFORM,
                             DIVERGENCE, True)
        sum_hs = tl.sum(tl.where(mask, hs, 0.0), axis=0)
        if HAS_GRAD:
            dz = g
            if NORMALISED:
                zc = zs - mu_s
                dz = normalisation_backward(g, zc, a_s, c1, c2, tl.sum(g, axis=0), tl.sum(g * zc, axis=0), inv_c)
            tl.store(g_base + lanes, dz.to(GRAD.dtype.element_ty), mask=mask)
    else:
        sum_pi = zero
        if IS_DIV and HAS_GRAD:
            # Σπ needs the final log-sum-exps: one more pass before any gradient
            for start in range(0, C, BLOCK):
                cols = start + lanes
                mask = cols < C
                hs = a_s * (_load_row_block(s_base, cols, mask, s_col, FP64) - mu_s)
                ht = a_t * (_load_row_block(t_base, cols, mask, t_col, FP64) - mu_t)
                sum_pi += _block_pi_sum(hs, ht, mask, inv_t, shift_s, log_zst, shift_t, log_zt, div_w, DIVERGENCE)
        if NORMALISED and HAS_GRAD:
            # the two row sums the normalisation's backward needs
            for start in range(0, C, BLOCK):
                cols = start + lanes
                mask = cols < C
                zc = _load_row_block(s_base, cols, mask, s_col, FP64) - mu_s
                ht = zc
                if TEACHER == TEACHER_SOFTMAX:
                    ht = a_t * (_load_row_block(t_base, cols, mask, t_col, FP64) - mu_t)
                g, _ = _block_terms(a_s * zc, ht, cols, mask, y, inv_t, inv_c, shift_s, log_zst, log_zs1, shift_t,
                                    log_zt, log_rho, log_other, kl_coef, ce_coef, u_coef, poison, div_w, sum_pi,
                                    TEACHER, HAS_CE, HAS_UNIFORM, DIVERGENCE, False)
                sum_g += tl.sum(g, axis=0)
                sum_gz += tl.sum(tl.where(mask, g * zc, 0.0), axis=0)
        for start in range(0, C, BLOCK):
            cols = start + lanes
            mask = cols < C
            zc = _load_row_block(s_base, cols, mask, s_col, FP64) - mu_s
            hs = a_s * zc
            ht = hs
            if TEACHER == TEACHER_SOFTMAX:
                ht = a_t * (_load_row_block(t_base, cols, mask, t_col, FP64) - mu_t)
            g, kl_block = _block_terms(hs, ht, cols, mask, y, inv_t, inv_c, shift_s, log_zst, log_zs1, shift_t,
                                       log_zt, log_rho, log_other, kl_coef, ce_coef, u_coef, poison, div_w, sum_pi,
                                       TEACHER, HAS_CE, HAS_UNIFORM, DIVERGENCE, False)
            kl += kl_block
            sum_hs += tl.sum(tl.where(mask, hs, 0.0), axis=0)
            if HAS_GRAD:
                dz = g
                if NORMALISED:
                    dz = normalisation_backward(g, zc, a_s, c1, c2, sum_g, sum_gz, inv_c)
                tl.store(g_base + cols, dz.to(GRAD.dtype.element_ty), mask=mask)

    loss = zero + poison
    if HAS_KL:
        loss += kl_w * kl
    if HAS_CE:
        loss += ce_w * w * (log_zs1 - (hs_y - shift_s))   # −log p_y
    if HAS_UNIFORM:
        # −mean log p from the mean of h, not from Σ(h − m): C·(h − m) overflows before a mean does
        loss += u_w * (log_zs1 - (sum_hs * inv_c - shift_s))
    tl.store(LOSS + row, loss)


def kernel_meta(params: RowSoftmaxParams, has_teacher: bool, has_target: bool) -> dict:
    """The constexpr switches for a parameter set (also used by the AOT compile test): the teacher
    code is the KL term's (none without a KL term)."""
    normalize = NORMALIZE_CODES[params.normalize]
    has_kl = has_teacher and params.teacher != "none" and params.kl_weight != 0
    if params.teacher == "partial" and has_kl and not has_target:
        raise ValueError("the partial teacher needs a target")
    teacher = TEACHER_CODES[params.teacher] if has_kl else TEACHER_CODES["none"]
    reweight = params.reweight and has_teacher and has_target and params.ce_weight != 0
    norm_t = normalize if teacher == TEACHER_CODES["softmax"] else NORMALIZE_CODES["none"]
    divergence = DIVERGENCE_CODES[params.divergence]
    if teacher != TEACHER_CODES["softmax"]:
        if has_kl and params.divergence != "forward_kl":
            raise ValueError(f"the divergence {params.divergence!r} needs a softmax teacher")
        divergence = DIVERGENCE_CODES["forward_kl"]  # no divergence term: one compiled variant
    if reweight and norm_t != NORMALIZE_CODES["none"]:
        raise ValueError("re-weighting reads the raw teacher; it cannot be combined with a normalised teacher")
    return dict(
        NORM=normalize,
        NORM_T=norm_t,
        TEACHER=teacher,
        HAS_CE=params.ce_weight != 0 and has_target,
        HAS_UNIFORM=params.uniform_weight != 0 and has_target,
        REWEIGHT=reweight,
        HAS_TARGET=has_target,
        HAS_TEACHER=has_teacher,
        DIVERGENCE=divergence,
    )


@kernel_op("kdfast::triton_row_softmax")
def triton_row_softmax(student: torch.Tensor, teacher: Optional[torch.Tensor], target: Optional[torch.Tensor],
                       normalize: str, teacher_mode: str, multiplier: float, eps: float, temperature: float,
                       kl_weight: float, ce_weight: float, uniform_weight: float, reweight: bool,
                       reweight_alpha: float, reweight_eps: float, ignore_index: int,
                       block_size: int, compute_grad: bool = True, wide_grad: bool = False,
                       divergence: str = "forward_kl",
                       divergence_param: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_rows [N] fp32 (fp64 for fp64 input), grad [N, C] in the input dtype, fp32 for half
    inputs with ``wide_grad``, empty without ``compute_grad``); block_size ≤ 0 picks the block by the
    heuristic of ``_common.row_block``; ``divergence`` (and its weight) the KL term's form."""
    rows, num_classes = student.shape
    loss = torch.empty(rows, dtype=accumulate_dtype(student.dtype), device=student.device)
    grad, grad_arg = gradient_output(student, compute_grad, wide_grad)
    if rows == 0:
        return loss, grad
    params = RowSoftmaxParams(normalize=normalize, multiplier=multiplier, eps=eps, temperature=temperature,
                              teacher=teacher_mode, kl_weight=kl_weight, ce_weight=ce_weight,
                              uniform_weight=uniform_weight, reweight=reweight, reweight_alpha=reweight_alpha,
                              reweight_eps=reweight_eps, ignore_index=ignore_index, divergence=divergence,
                              divergence_param=divergence_param)
    meta = kernel_meta(params, teacher is not None, target is not None)
    block, single = row_block(num_classes, block_size if block_size > 0 else None)
    # unused pointers get a valid tensor of the right kind; the constexprs keep them unread
    teacher_arg = teacher if teacher is not None else student
    target_arg = target if target is not None else torch.empty(1, dtype=torch.int64, device=student.device)
    launch(_row_softmax_kernel, (rows,),
        student, teacher_arg, target_arg, loss, grad_arg,
        num_classes, float(num_classes), student.stride(0), student.stride(1),
        teacher_arg.stride(0), teacher_arg.stride(1), target_arg.stride(0), grad.stride(0) if compute_grad else 0,
        multiplier if normalize != "none" else 1.0, eps, 1.0 / temperature, kl_weight, ce_weight, uniform_weight,
        reweight_alpha, reweight_eps, ignore_index, divergence_param,
        FP64=student.dtype == torch.float64, SINGLE=single, BLOCK=block, HAS_GRAD=compute_grad,
        num_warps=row_warps(block), **meta)
    return loss, grad


def row_softmax(student: torch.Tensor, teacher: Optional[torch.Tensor], target: Optional[torch.Tensor],
                params: RowSoftmaxParams, block_size: int = 0, *, compute_grad: bool = True,
                wide_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's row-softmax kernel; ``block_size`` > 0 forces the column block. Labels may be
    of any integer dtype and stride; a row whose label equals ``params.ignore_index`` gets loss 0 and
    a zero gradient row, a label outside [0, C) a NaN loss and a NaN gradient row."""
    return torch.ops.kdfast.triton_row_softmax(
        student, teacher, target, params.normalize, params.teacher, float(params.multiplier), float(params.eps),
        float(params.temperature), float(params.kl_weight), float(params.ce_weight), float(params.uniform_weight),
        bool(params.reweight), float(params.reweight_alpha), float(params.reweight_eps), int(params.ignore_index),
        int(block_size), bool(compute_grad), bool(wide_grad), params.divergence, float(params.divergence_param))
