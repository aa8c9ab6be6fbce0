"""Feature–centre family in Triton: the ND loss in one pass per row (contract:
:mod:`kdfast.backends._contract`).

Per row: gather the raw centre c_y by label, the four row dots ⟨u, c⟩, ‖u‖², ‖f^t‖², ‖c‖² in the
compute dtype, ê = c/max(‖c‖, ε), M = max(‖u‖ or ‖f^t‖, ε) (tie → ‖u‖, the cosine branch), then

    ℓ = 1 − ⟨u, ê⟩/M,    ∂ℓ/∂u = −ê/M + [M = ‖u‖ > ε]·⟨u, ê⟩·u/‖u‖³.

A row whose label equals ``ignore_index`` gets ℓ = 0 and a zero gradient row (nothing else is
read); a NaN in the row's u or f^t makes ℓ and the whole gradient row NaN (so does a NaN in the
centre it reads); a label outside [0, num_centres) gives NaN instead of an out-of-bounds read.
A row of up to MAX_SINGLE_BLOCK features is loaded once; longer rows take two passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._contract import NO_IGNORE_INDEX
from ._common import (acc_zero, accumulate_dtype, gradient_output, kernel_op, launch, row_block, row_warps, skip_row,
                      upcast)


@triton.jit
def _nd_row_dots(u, ft, c):
    return tl.sum(u * c, axis=0), tl.sum(u * u, axis=0), tl.sum(ft * ft, axis=0), tl.sum(c * c, axis=0)


@triton.jit
def feature_centre_terms(u_dot_centre, centre_squares, u_squares, teacher_squares, eps):
    """(ℓ, kc, ku) of one row, ∂ℓ/∂u = kc·c + ku·u (the C++ contract's feature_centre_terms):
    ℓ = 1 − ⟨u, ê⟩/M, ê = c/max(‖c‖, ε), M = max(‖u‖, ‖f^t‖) clamped at ε (a tie takes ‖u‖, the cosine
    branch); kc = −1/(max(‖c‖, ε)·M), ku = [M is ‖u‖, not clamped, u ≠ 0]·⟨u, ê⟩/(M²‖u‖). A NaN in u
    or f^t makes M, hence ℓ and kc, NaN (the clamps propagate NaN)."""
    centre_norm = tl.maximum(tl.sqrt(centre_squares), eps, propagate_nan=tl.PropagateNan.ALL)
    u_norm = tl.sqrt(u_squares)
    teacher_norm = tl.sqrt(teacher_squares)
    student_branch = ~(u_norm < teacher_norm)
    raw_scale = tl.where(student_branch, tl.maximum(u_norm, teacher_norm, propagate_nan=tl.PropagateNan.ALL),
                         teacher_norm)
    scale = tl.maximum(raw_scale, eps, propagate_nan=tl.PropagateNan.ALL)
    cosine_part = u_dot_centre / centre_norm
    through_norm = student_branch & (raw_scale >= eps) & (u_norm > 0)
    ku = tl.where(through_norm, cosine_part / (scale * scale * u_norm), 0.0)
    return 1.0 - cosine_part / scale, -1.0 / (centre_norm * scale), ku


@triton.jit
def _nd_kernel(U, FT, Y, CEN, LOSS, GRAD, D, num_centres, u_row, u_col, t_row, t_col, y_stride, c_row, c_col,
               g_row, eps, ignore_index, FP64: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr,
               HAS_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(Y + row * y_stride).to(tl.int64)
    u_base = U + row * u_row
    t_base = FT + row * t_row
    c_base = CEN + y * c_row
    g_base = GRAD + row * g_row
    lanes = tl.arange(0, BLOCK)
    if skip_row(y, ignore_index, num_centres, g_base, LOSS + row, D, FP64, BLOCK, HAS_GRAD):
        return

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

    loss, kc, ku = feature_centre_terms(uc, cc, uu, tt, eps)
    tl.store(LOSS + row, loss)
    if not HAS_GRAD:
        return
    if SINGLE:
        tl.store(g_base + lanes, (kc * c + ku * u).to(GRAD.dtype.element_ty), mask=mask)
    else:
        for start in range(0, D, BLOCK):
            cols = start + lanes
            mask = cols < D
            offs = cols.to(tl.int64)
            u = upcast(tl.load(u_base + offs * u_col, mask=mask, other=0.0), FP64)
            c = upcast(tl.load(c_base + offs * c_col, mask=mask, other=0.0), FP64)
            tl.store(g_base + cols, (kc * c + ku * u).to(GRAD.dtype.element_ty), mask=mask)


@kernel_op("kdfast::triton_feature_centre")
def triton_feature_centre(u: torch.Tensor, teacher_features: torch.Tensor, target: torch.Tensor,
                          centers: torch.Tensor, eps: float, ignore_index: int,
                          block_size: int, compute_grad: bool = True,
                          wide_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    rows, dim = u.shape
    loss = torch.empty(rows, dtype=accumulate_dtype(u.dtype), device=u.device)
    grad, grad_arg = gradient_output(u, compute_grad, wide_grad)
    if rows == 0:
        return loss, grad
    block, single = row_block(dim, block_size if block_size > 0 else None)
    launch(_nd_kernel, (rows,),
        u, teacher_features, target, centers, loss, grad_arg, dim, centers.shape[0], u.stride(0), u.stride(1),
        teacher_features.stride(0), teacher_features.stride(1), target.stride(0), centers.stride(0),
        centers.stride(1), grad.stride(0) if compute_grad else 0, eps, ignore_index, FP64=u.dtype == torch.float64,
        SINGLE=single, BLOCK=block, HAS_GRAD=compute_grad, num_warps=row_warps(block))
    return loss, grad


def feature_centre(u: torch.Tensor, teacher_features: torch.Tensor, target: torch.Tensor, centers: torch.Tensor,
                   eps: float, ignore_index: int = NO_IGNORE_INDEX, block_size: int = 0, *,
                   compute_grad: bool = True, wide_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's feature–centre kernel; ``ignore_index`` (default: none ignored) as in the
    module docstring, labels of any integer dtype and stride; ``block_size`` > 0 forces the block."""
    return torch.ops.kdfast.triton_feature_centre(u, teacher_features, target, centers, float(eps),
                                                  int(ignore_index), int(block_size), bool(compute_grad),
                                                  bool(wide_grad))
