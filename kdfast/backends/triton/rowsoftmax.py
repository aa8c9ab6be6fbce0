"""Row-softmax family in Triton: KD, SKD (layernorm / l2 / standardize), CE, KD-pt, label
smoothing, re-weighted CE and ignore_index as compile-time modes of one kernel; the loss and the
gradient come out of the same launch (contract: ``kdfast.backends._fused``).

Per row, with h = a·(z − μ) the normalised logits (a = 1, μ = 0 without normalisation)::

    g  = kl_w/T·(softmax(h^s/T) − q) + ce_w·w·(softmax(h^s) − e_y) + u_w·(softmax(h^s) − 1/C)
    dz = a·(g − c1·mean(g)) − a·c2·Σ_j g_j(z_j − μ) · (z − μ)

where (c1, c2) encode the normalisation's backward (see ``_norm_coeffs``). One program per row:
a row that fits in one block is loaded once and kept in registers; a longer row is streamed in
up to four passes (statistics, online log-sum-exp, the two gradient sums, the gradient store).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._fused import RowSoftmaxParams
from ._common import acc_zero, accumulate_dtype, kernel_op, launch, row_block, row_warps, upcast

NORMALIZE_CODES = {"none": 0, "layernorm": 1, "l2": 2, "standardize": 3}
TEACHER_CODES = {"none": 0, "softmax": 1, "partial": 2}


@triton.jit
def _block_moments(x, mask):
    """(count, mean, M2) of the valid lanes, two-pass inside the block."""
    n = tl.sum(mask.to(x.dtype), axis=0)
    mean = tl.sum(tl.where(mask, x, 0.0), axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    return n, mean, tl.sum(d * d, axis=0)


@triton.jit
def _merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries; n_a = 0 is allowed."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / n
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _norm_coeffs(mean, m2, num_classes, kappa, eps, NORM: tl.constexpr):
    """(μ, a, c1, c2) such that h = a·(z − μ) and dz = a·(g − c1·mean g) − a·c2·Σg(z−μ)·(z − μ).

    layernorm: a = κ/√(var+ε), c2 = 1/(C(var+ε)); l2: a = κ/max(‖z‖, ε), c2 = 1/‖z‖² unless
    clamped; standardize: a = κ/(σ+ε) with the unbiased σ, c2 = 1/((C−1)σ(σ+ε)) unless σ = 0.
    The clamps have zero slope, as in the reference."""
    zero = mean * 0.0
    if NORM == 1:
        var_eps = m2 / num_classes + eps
        return mean, kappa / tl.sqrt(var_eps), zero + 1.0, 1.0 / (num_classes * var_eps)
    elif NORM == 2:
        norm = tl.sqrt(m2 + num_classes * mean * mean)
        clamped = tl.maximum(norm, eps)
        c2 = tl.where(norm > eps, 1.0 / (clamped * clamped), 0.0)
        return zero, kappa / clamped, zero, c2
    elif NORM == 3:
        var = m2 / tl.maximum(num_classes - 1.0, 1.0)
        live = var > 1.1754944e-38  # the reference clamps var at fp32's tiny before the sqrt
        std = tl.sqrt(tl.maximum(var, 1.1754944e-38))
        c2 = tl.where(live, 1.0 / (tl.maximum(num_classes - 1.0, 1.0) * std * (std + eps)), 0.0)
        return mean, kappa / (std + eps), zero + 1.0, c2
    else:
        return zero, zero + 1.0, zero, zero


@triton.jit
def _lse_update(m, l, x, mask):
    """Fold the valid lanes of x into a running (max, Σ exp(x − max)); all-masked stays (−inf, 0)."""
    xm = tl.where(mask, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(xm, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_new = l * tl.exp(m - m_safe) + tl.sum(tl.where(mask, tl.exp(xm - m_safe), 0.0), axis=0)
    return m_new, l_new


@triton.jit
def _load_row_block(base, cols, mask, stride, FP64: tl.constexpr):
    return upcast(tl.load(base + cols.to(tl.int64) * stride, mask=mask, other=0.0), FP64)


@triton.jit
def _lse_block(hs, ht, cols, mask, y, inv_t, m_st, l_st, m_s1, l_s1, m_t, l_t, m_o, l_o,
               HAS_KL: tl.constexpr, NEED_P1: tl.constexpr, NEED_TLSE: tl.constexpr, PARTIAL: tl.constexpr):
    """One block's share of every log-sum-exp the row needs: student at T and at 1, teacher at T,
    and (partial teacher) the teacher at T over the classes c ≠ y."""
    if HAS_KL:
        m_st, l_st = _lse_update(m_st, l_st, hs * inv_t, mask)
    if NEED_P1:
        m_s1, l_s1 = _lse_update(m_s1, l_s1, hs, mask)
    if NEED_TLSE:
        m_t, l_t = _lse_update(m_t, l_t, ht * inv_t, mask)
    if PARTIAL:
        m_o, l_o = _lse_update(m_o, l_o, ht * inv_t, mask & (cols != y))
    return m_st, l_st, m_s1, l_s1, m_t, l_t, m_o, l_o


@triton.jit
def _grad_block(hs, ht, cols, mask, y, inv_t, lse_st, lse_s1, lse_t, log_rho, log_other, w,
                kl_w, ce_w, u_w, inv_c, HAS_KL: tl.constexpr, TEACHER: tl.constexpr,
                HAS_CE: tl.constexpr, HAS_UNIFORM: tl.constexpr):
    """(∂ℓ/∂h on the block, the block's share of KL(q ‖ p_T)); masked lanes get 0."""
    g = tl.zeros_like(hs)
    kl = tl.sum(g, axis=0)
    if HAS_KL:
        log_pt = hs * inv_t - lse_st
        if TEACHER == 1:
            log_q = ht * inv_t - lse_t
        else:
            log_q = tl.where(cols == y, log_rho, log_other)
        log_q = tl.where(mask, log_q, float("-inf"))
        q = tl.exp(log_q)
        g += (kl_w * inv_t) * (tl.exp(log_pt) - q)
        # 0·log 0 = 0 (only an exact 0: a NaN teacher must stay NaN): the partial teacher's ρ can round
        # to 1, and C = 1 leaves no other class
        kl = tl.sum(tl.where(q != 0, q * (tl.where(q != 0, log_q, 0.0) - log_pt), 0.0), axis=0)
    if HAS_CE or HAS_UNIFORM:
        p = tl.exp(hs - lse_s1)
        if HAS_CE:
            g += (ce_w * w) * (p - tl.where(cols == y, 1.0, 0.0))
        if HAS_UNIFORM:
            g += u_w * (p - inv_c)
    return tl.where(mask, g, 0.0), kl


@triton.jit
def _row_softmax_kernel(
    S, T, Y, LOSS, GRAD,
    C, num_classes, s_row, s_col, t_row, t_col, g_row,
    kappa, eps, inv_t, kl_w, ce_w, u_w, rw_alpha, rw_eps, ignore_index,
    NORM: tl.constexpr, NORM_T: tl.constexpr, TEACHER: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_CE: tl.constexpr, HAS_UNIFORM: tl.constexpr, REWEIGHT: tl.constexpr, HAS_TARGET: tl.constexpr,
    FP64: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 row offsets: N·C may exceed 2^31
    s_base = S + row * s_row
    t_base = T + row * t_row
    g_base = GRAD + row * g_row
    lanes = tl.arange(0, BLOCK)
    LOAD_T: tl.constexpr = TEACHER != 0 or REWEIGHT
    NEED_P1: tl.constexpr = HAS_CE or HAS_UNIFORM or REWEIGHT
    NEED_TLSE: tl.constexpr = TEACHER != 0 or REWEIGHT

    y = row * 0
    if HAS_TARGET:
        y = tl.load(Y + row)
        if y == ignore_index:
            # an ignored row: zero loss, zero gradient, nothing else read
            for start in range(0, C, BLOCK):
                cols = start + lanes
                tl.store(g_base + cols, tl.zeros([BLOCK], dtype=GRAD.dtype.element_ty), mask=cols < C)
            tl.store(LOSS + row, acc_zero(FP64))
            return

    zero = acc_zero(FP64)
    # ---- pass A: normalisation statistics (student; teacher when it is normalised too)
    mean_s = zero
    m2_s = zero
    mean_t = zero
    m2_t = zero
    if SINGLE:
        mask = lanes < C
        zs = _load_row_block(s_base, lanes, mask, s_col, FP64)
        zt = zs
        if LOAD_T:
            zt = _load_row_block(t_base, lanes, mask, t_col, FP64)
        if NORM != 0:
            _, mean_s, m2_s = _block_moments(zs, mask)
        if NORM_T != 0:
            _, mean_t, m2_t = _block_moments(zt, mask)
    else:
        if NORM != 0:
            n_s = zero
            n_t = zero
            for start in range(0, C, BLOCK):
                cols = start + lanes
                mask = cols < C
                zs = _load_row_block(s_base, cols, mask, s_col, FP64)
                nb, mb, m2b = _block_moments(zs, mask)
                n_s, mean_s, m2_s = _merge_moments(n_s, mean_s, m2_s, nb, mb, m2b)
                if NORM_T != 0:
                    zt = _load_row_block(t_base, cols, mask, t_col, FP64)
                    nb, mb, m2b = _block_moments(zt, mask)
                    n_t, mean_t, m2_t = _merge_moments(n_t, mean_t, m2_t, nb, mb, m2b)
    mu_s, a_s, c1, c2 = _norm_coeffs(mean_s, m2_s, num_classes, kappa, eps, NORM)
    mu_t, a_t, _, _ = _norm_coeffs(mean_t, m2_t, num_classes, kappa, eps, NORM_T)

    # ---- pass B: log-sum-exps
    m_st = zero + float("-inf")
    l_st = zero
    m_s1 = m_st
    l_s1 = zero
    m_t = m_st
    l_t = zero
    m_o = m_st
    l_o = zero
    if SINGLE:
        hs = tl.where(mask, a_s * (zs - mu_s), 0.0)
        ht = tl.where(mask, a_t * (zt - mu_t), 0.0)
        m_st, l_st, m_s1, l_s1, m_t, l_t, m_o, l_o = _lse_block(
            hs, ht, lanes, mask, y, inv_t, m_st, l_st, m_s1, l_s1, m_t, l_t, m_o, l_o,
            HAS_KL, NEED_P1, NEED_TLSE, TEACHER == 2)
    else:
        for start in range(0, C, BLOCK):
            cols = start + lanes
            mask = cols < C
            hs = tl.where(mask, a_s * (_load_row_block(s_base, cols, mask, s_col, FP64) - mu_s), 0.0)
            ht = hs
            if LOAD_T:
                ht = tl.where(mask, a_t * (_load_row_block(t_base, cols, mask, t_col, FP64) - mu_t), 0.0)
            m_st, l_st, m_s1, l_s1, m_t, l_t, m_o, l_o = _lse_block(
                hs, ht, cols, mask, y, inv_t, m_st, l_st, m_s1, l_s1, m_t, l_t, m_o, l_o,
                HAS_KL, NEED_P1, NEED_TLSE, TEACHER == 2)
    lse_st = zero
    lse_s1 = zero
    lse_t = zero
    if HAS_KL:
        lse_st = m_st + tl.log(l_st)
    if NEED_P1:
        lse_s1 = m_s1 + tl.log(l_s1)
    if NEED_TLSE:
        lse_t = m_t + tl.log(l_t)

    # ---- row scalars at the label: CE term, partial teacher, re-weighting
    hs_y = zero
    log_rho = zero
    log_other = zero
    w = zero + 1.0
    if HAS_CE or REWEIGHT:
        hs_y = a_s * (upcast(tl.load(s_base + y * s_col), FP64) - mu_s)
    if TEACHER == 2 or REWEIGHT:
        # the partial teacher and ρ use the raw teacher at T (spec §4a, §4c)
        log_rho = upcast(tl.load(t_base + y * t_col), FP64) * inv_t - lse_t
    if TEACHER == 2:
        # log(1 − ρ) from the log-sum-exp over c ≠ y, never log(1 − exp(log ρ)); −inf when C = 1
        log_other = (m_o + tl.log(l_o)) - lse_t - tl.log(tl.maximum(num_classes - 1.0, 1.0))
    if REWEIGHT:
        one_minus_p = 1.0 - tl.exp(hs_y - lse_s1)
        w = 1.0 - rw_alpha * (1.0 - tl.exp(log_rho)) / tl.maximum(one_minus_p, rw_eps)

    # ---- gradient, loss
    inv_c = 1.0 / num_classes
    sum_g = zero
    sum_gz = zero
    kl = zero
    sum_h = zero
    if SINGLE:
        g, kl = _grad_block(hs, ht, lanes, mask, y, inv_t, lse_st, lse_s1, lse_t, log_rho, log_other, w,
                            kl_w, ce_w, u_w, inv_c, HAS_KL, TEACHER, HAS_CE, HAS_UNIFORM)
        sum_h = tl.sum(hs, axis=0)
        zc = zs - mu_s
        if NORM != 0:
            sum_g = tl.sum(g, axis=0)
            sum_gz = tl.sum(g * zc, axis=0)
        dz = a_s * (g - c1 * sum_g * inv_c) - (a_s * c2 * sum_gz) * zc
        tl.store(g_base + lanes, dz.to(GRAD.dtype.element_ty), mask=mask)
    else:
        if NORM != 0:
            # pass C: the two row sums the normalisation's backward needs
            for start in range(0, C, BLOCK):
                cols = start + lanes
                mask = cols < C
                zc = _load_row_block(s_base, cols, mask, s_col, FP64) - mu_s
                hs = tl.where(mask, a_s * zc, 0.0)
                ht = hs
                if LOAD_T:
                    ht = tl.where(mask, a_t * (_load_row_block(t_base, cols, mask, t_col, FP64) - mu_t), 0.0)
                g, _ = _grad_block(hs, ht, cols, mask, y, inv_t, lse_st, lse_s1, lse_t, log_rho, log_other, w,
                                   kl_w, ce_w, u_w, inv_c, HAS_KL, TEACHER, HAS_CE, HAS_UNIFORM)
                sum_g += tl.sum(g, axis=0)
                sum_gz += tl.sum(g * zc, axis=0)
        # pass D: the gradient store (and the loss sums)
        for start in range(0, C, BLOCK):
            cols = start + lanes
            mask = cols < C
            zc = _load_row_block(s_base, cols, mask, s_col, FP64) - mu_s
            hs = tl.where(mask, a_s * zc, 0.0)
            ht = hs
            if LOAD_T:
                ht = tl.where(mask, a_t * (_load_row_block(t_base, cols, mask, t_col, FP64) - mu_t), 0.0)
            g, kl_b = _grad_block(hs, ht, cols, mask, y, inv_t, lse_st, lse_s1, lse_t, log_rho, log_other, w,
                                  kl_w, ce_w, u_w, inv_c, HAS_KL, TEACHER, HAS_CE, HAS_UNIFORM)
            kl += kl_b
            sum_h += tl.sum(hs, axis=0)
            dz = a_s * (g - c1 * sum_g * inv_c) - (a_s * c2 * sum_gz) * zc
            tl.store(g_base + cols, dz.to(GRAD.dtype.element_ty), mask=mask)

    loss = zero
    if HAS_KL:
        loss += kl_w * kl
    if HAS_CE:
        loss += ce_w * w * (lse_s1 - hs_y)
    if HAS_UNIFORM:
        loss += u_w * (lse_s1 - sum_h * inv_c)
    tl.store(LOSS + row, loss)


def kernel_meta(params: RowSoftmaxParams, has_teacher: bool, has_target: bool) -> dict:
    """The constexpr switches for a parameter set (also used by the AOT compile test)."""
    normalize = NORMALIZE_CODES[params.normalize]
    teacher = TEACHER_CODES[params.teacher] if has_teacher else 0
    return dict(
        NORM=normalize,
        NORM_T=normalize if teacher == 1 else 0,
        TEACHER=teacher,
        HAS_KL=teacher != 0 and params.kl_weight != 0,
        HAS_CE=params.ce_weight != 0 and has_target,
        HAS_UNIFORM=params.uniform_weight != 0 and has_target,
        REWEIGHT=params.reweight and has_teacher and has_target,
        HAS_TARGET=has_target,
    )


@kernel_op("kdfast::triton_row_softmax")
def triton_row_softmax(student: torch.Tensor, teacher: Optional[torch.Tensor], target: Optional[torch.Tensor],
                       normalize: str, teacher_mode: str, multiplier: float, eps: float, temperature: float,
                       kl_weight: float, ce_weight: float, uniform_weight: float, reweight: bool,
                       reweight_alpha: float, reweight_eps: float, ignore_index: int,
                       block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_rows [N] fp32 (fp64 for fp64 input), grad [N, C] in the input dtype); block_size ≤ 0
    picks the block by the heuristic of ``_common.row_block``."""
    rows, num_classes = student.shape
    loss = torch.empty(rows, dtype=accumulate_dtype(student.dtype), device=student.device)
    grad = torch.empty((rows, num_classes), dtype=student.dtype, device=student.device)
    if rows == 0:
        return loss, grad
    params = RowSoftmaxParams(normalize=normalize, multiplier=multiplier, eps=eps, temperature=temperature,
                              teacher=teacher_mode, kl_weight=kl_weight, ce_weight=ce_weight,
                              uniform_weight=uniform_weight, reweight=reweight, reweight_alpha=reweight_alpha,
                              reweight_eps=reweight_eps, ignore_index=ignore_index)
    meta = kernel_meta(params, teacher is not None, target is not None)
    block, single = row_block(num_classes, block_size if block_size > 0 else None)
    # unused pointers get a valid tensor of the right kind; the constexprs keep them unread
    teacher_arg = teacher if teacher is not None else student
    target_arg = target if target is not None else torch.empty(1, dtype=torch.int64, device=student.device)
    launch(_row_softmax_kernel, (rows,),
        student, teacher_arg, target_arg, loss, grad,
        num_classes, float(num_classes), student.stride(0), student.stride(1),
        teacher_arg.stride(0), teacher_arg.stride(1), grad.stride(0),
        multiplier if normalize != "none" else 1.0, eps, 1.0 / temperature, kl_weight, ce_weight, uniform_weight,
        reweight_alpha, reweight_eps, ignore_index,
        FP64=student.dtype == torch.float64, SINGLE=single, BLOCK=block, num_warps=row_warps(block), **meta)
    return loss, grad


def row_softmax(student: torch.Tensor, teacher: Optional[torch.Tensor], target: Optional[torch.Tensor],
                params: RowSoftmaxParams, block_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's row-softmax kernel (``_fused``); ``block_size`` > 0 forces the column block."""
    return torch.ops.kdfast.triton_row_softmax(
        student, teacher, target, params.normalize, params.teacher, float(params.multiplier), float(params.eps),
        float(params.temperature), float(params.kl_weight), float(params.ce_weight), float(params.uniform_weight),
        bool(params.reweight), float(params.reweight_alpha), float(params.reweight_eps), int(params.ignore_index),
        int(block_size))
