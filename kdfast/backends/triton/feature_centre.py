"""Feature–centre family in Triton: the ND loss (spec §2a–2c) in one pass per row.

Per row: gather the raw centre c_y by label, the four row dots ⟨u, c⟩, ‖u‖², ‖f^t‖², ‖c‖² in the
compute dtype, ê = c/max(‖c‖, ε), M = max(‖u‖ or ‖f^t‖, ε) (tie → ‖u‖, the cosine branch), then

    ℓ = 1 − ⟨u, ê⟩/M,    ∂ℓ/∂u = −ê/M + [M = ‖u‖ > ε]·⟨u, ê⟩·u/‖u‖³.

A row of up to MAX_SINGLE_BLOCK features is loaded once; longer rows take two passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_zero, accumulate_dtype, kernel_op, launch, row_block, row_warps, upcast


@triton.jit
def _nd_row_dots(u, ft, c):
    return tl.sum(u * c, axis=0), tl.sum(u * u, axis=0), tl.sum(ft * ft, axis=0), tl.sum(c * c, axis=0)


@triton.jit
def _nd_kernel(U, FT, Y, CEN, LOSS, GRAD, D, u_row, u_col, t_row, t_col, c_row, c_col, g_row, eps,
               FP64: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(Y + row).to(tl.int64)  # ignored rows arrive as class 0 (masked by the caller)
    u_base = U + row * u_row
    t_base = FT + row * t_row
    c_base = CEN + y * c_row
    g_base = GRAD + row * g_row
    lanes = tl.arange(0, BLOCK)

    uc = acc_zero(FP64)
    uu = uc
    tt = uc
    cc = uc
    if SINGLE:
        mask = lanes < D
        offs = lanes.to(tl.int64)
        u = upcast(tl.load(u_base + offs * u_col, mask=mask, other=0.0), FP64)
        ft = upcast(tl.load(t_base + offs * t_col, mask=mask, other=0.0), FP64)
        c = upcast(tl.load(c_base + offs * c_col, mask=mask, other=0.0), FP64)
        uc, uu, tt, cc = _nd_row_dots(u, ft, c)
    else:
        for start in range(0, D, BLOCK):
            cols = start + lanes
            mask = cols < D
            offs = cols.to(tl.int64)
            u = upcast(tl.load(u_base + offs * u_col, mask=mask, other=0.0), FP64)
            ft = upcast(tl.load(t_base + offs * t_col, mask=mask, other=0.0), FP64)
            c = upcast(tl.load(c_base + offs * c_col, mask=mask, other=0.0), FP64)
            d_uc, d_uu, d_tt, d_cc = _nd_row_dots(u, ft, c)
            uc += d_uc
            uu += d_uu
            tt += d_tt
            cc += d_cc

    inv_c = 1.0 / tl.maximum(tl.sqrt(cc), eps)
    u_norm = tl.sqrt(uu)
    cosine = u_norm >= tl.sqrt(tt)  # a tie takes the cosine branch, as Python's max in the official code
    scale = tl.maximum(tl.where(cosine, u_norm, tl.sqrt(tt)), eps)
    ue = uc * inv_c
    tl.store(LOSS + row, 1.0 - ue / scale)
    # coefficients of ∂ℓ/∂u = −(inv_c/M)·c + k·u; k ≠ 0 only where M is ‖u‖ itself (not a clamp)
    coef_c = -inv_c / scale
    k = tl.where(cosine & (u_norm > eps), ue / (scale * scale * scale), 0.0)
    if SINGLE:
        tl.store(g_base + lanes, (coef_c * c + k * u).to(GRAD.dtype.element_ty), mask=mask)
    else:
        for start in range(0, D, BLOCK):
            cols = start + lanes
            mask = cols < D
            offs = cols.to(tl.int64)
            u = upcast(tl.load(u_base + offs * u_col, mask=mask, other=0.0), FP64)
            c = upcast(tl.load(c_base + offs * c_col, mask=mask, other=0.0), FP64)
            tl.store(g_base + cols, (coef_c * c + k * u).to(GRAD.dtype.element_ty), mask=mask)


@kernel_op("kdfast::triton_feature_centre")
def triton_feature_centre(u: torch.Tensor, teacher_features: torch.Tensor, target: torch.Tensor,
                          centers: torch.Tensor, eps: float, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, dim = u.shape
    loss = torch.empty(rows, dtype=accumulate_dtype(u.dtype), device=u.device)
    grad = torch.empty((rows, dim), dtype=u.dtype, device=u.device)
    if rows == 0:
        return loss, grad
    block, single = row_block(dim, block_size if block_size > 0 else None)
    launch(_nd_kernel, (rows,),
        u, teacher_features, target, centers, loss, grad, dim, u.stride(0), u.stride(1),
        teacher_features.stride(0), teacher_features.stride(1), centers.stride(0), centers.stride(1),
        grad.stride(0), eps, FP64=u.dtype == torch.float64, SINGLE=single, BLOCK=block,
        num_warps=row_warps(block))
    return loss, grad


def feature_centre(u: torch.Tensor, teacher_features: torch.Tensor, target: torch.Tensor, centers: torch.Tensor,
                   eps: float, block_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's feature–centre kernel (``_fused``); ``block_size`` > 0 forces the block."""
    return torch.ops.kdfast.triton_feature_centre(u, teacher_features, target.long(), centers, float(eps),
                                                  int(block_size))
