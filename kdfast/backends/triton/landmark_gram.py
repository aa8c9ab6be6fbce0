"""Landmark-Gram family in Triton: KDA / Nyström partial-Gram transfer (contract:
:mod:`kdfast.backends._contract`).

One program per tile of BLOCK_B rows:  S^s = F^s·C^sᵀ by ``tl.dot`` over K-blocks of d_s,
R = S^s − S^t, the smooth-L1 / square epilogue with per-row sums, G = ∂ℓ/∂R, and the
gradient G·C^s by a second ``tl.dot``. When all m landmarks fit in one tile (m ≤ MAX_FUSED_M, the
usual case: m = number of classes ≤ 256) G stays in registers and the gradient is written by the
same program; otherwise G is written to an fp32 [B, m] scratch and a second kernel multiplies.

The teacher side S^t = F^t·C^tᵀ and ‖S^t‖_F are a torch matmul (computed once per batch, no
gradient); the contract's factor weight/(‖S^t‖_F + eps) is read by the kernel from a device scalar
and applied to the loss rows and to G before G·C^s, so no pass over the [B, d] gradient follows.
Tiles are padded to 16 with masked loads because ``tl.dot`` needs every dimension ≥ 16.

The compute dtype is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs (fp64 ``tl.dot``):
it is the dtype of the teacher Gram S^t, the scale, the loss rows and the G scratch. A NaN in a
student row makes its S^s row, hence its R, G and gradient rows NaN (huber's slope for |r| ≥ β is
r/|r|, which keeps a NaN); a NaN teacher row does the same through S^t.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._contract import GRAM_KIND_CODES
from ._common import INTERPRETED, accumulate_dtype, gradient_output, kernel_op, launch

GRAM_SMOOTH_L1: tl.constexpr = tl.constexpr(GRAM_KIND_CODES["smooth_l1"])
GRAM_SQUARED: tl.constexpr = tl.constexpr(GRAM_KIND_CODES["sq_fro"])
BLOCK_B = 16      # rows per program: the smallest tl.dot tile; B is small in KD (≤ a few hundred)
BLOCK_K = 32      # reduction block over the feature dimension for S = F·Cᵀ
BLOCK_D = 32      # output block over the feature dimension for G·C (64 spilled at m = 100, sm_90)
MAX_FUSED_M = 256  # a 16 × 256 fp32 G tile stays in registers at 8 warps (16 values per thread)


def gram_warps(block_m: int) -> int:
    """8 warps once the landmark tile reaches 128 (ptxas: 4 warps spilled there), else 4."""
    return 8 if block_m >= 128 else 4


def _tile(n: int, cap: int) -> int:
    return min(max(triton.next_power_of_2(max(n, 1)), 16), cap)


@triton.jit
def _residual_epilogue(r, beta, KIND: tl.constexpr):
    """(elementwise loss, its derivative) of the residual: huber_β (smooth-L1) or r²."""
    if KIND == GRAM_SMOOTH_L1:
        size = tl.abs(r)
        small = size < beta
        loss = tl.where(small, 0.5 * r * r / beta, size - 0.5 * beta)
        # r/|r|, not a sign select: a NaN residual keeps its NaN (|r| ≥ β > 0 elsewhere)
        grad = tl.where(small, r / beta, r / tl.where(small, 1.0, size))
    else:
        loss = r * r
        grad = 2.0 * r
    return loss, grad


@triton.jit
def _gram_kernel(FS, CS, ST, SCALE, LOSS, GRAD, GSCRATCH, B, M, DS,
                 fs_row, fs_col, cs_row, cs_col, st_row, g_row, gs_row, beta,
                 KIND: tl.constexpr, HAS_GRAD: tl.constexpr, FUSED_GRAD: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    scale = tl.load(SCALE)
    acc_type = ST.dtype.element_ty  # the compute dtype: fp32, or fp64 for fp64 inputs
    loss_rows = tl.zeros([BLOCK_B], dtype=acc_type)
    for m_start in range(0, M, BLOCK_M):
        lm = m_start + tl.arange(0, BLOCK_M)
        lm_mask = lm < M
        gram = tl.zeros([BLOCK_B, BLOCK_M], dtype=acc_type)
        for k_start in range(0, DS, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_mask = ks < DS
            f = tl.load(FS + rows[:, None] * fs_row + ks[None, :] * fs_col,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            c = tl.load(CS + lm[:, None] * cs_row + ks[None, :] * cs_col,
                        mask=lm_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:  # operands in the compute dtype: the interpreter's half-precision dot is wrong
                f = f.to(acc_type)
                c = c.to(acc_type)
            gram = tl.dot(f, tl.trans(c), gram, input_precision=PRECISION)
        tile_mask = row_mask[:, None] & lm_mask[None, :]
        teacher = tl.load(ST + rows[:, None] * st_row + lm[None, :], mask=tile_mask, other=0.0)
        loss, g = _residual_epilogue(gram - teacher, beta, KIND)
        loss_rows += tl.sum(tl.where(tile_mask, loss, 0.0), axis=1)
        g = tl.where(tile_mask, g * scale, 0.0)
        if HAS_GRAD and FUSED_GRAD:  # the only landmark tile: ∂ℓ/∂F^s = G·C^s straight from registers
            for d_start in range(0, DS, BLOCK_D):
                ds = d_start + tl.arange(0, BLOCK_D)
                d_mask = ds < DS
                c = tl.load(CS + lm[:, None] * cs_row + ds[None, :] * cs_col,
                            mask=lm_mask[:, None] & d_mask[None, :], other=0.0).to(acc_type)
                out = tl.dot(g, c, input_precision=GRAD_PRECISION)
                tl.store(GRAD + rows[:, None] * g_row + ds[None, :], out.to(GRAD.dtype.element_ty),
                         mask=row_mask[:, None] & d_mask[None, :])
        elif HAS_GRAD:
            tl.store(GSCRATCH + rows[:, None] * gs_row + lm[None, :], g, mask=tile_mask)
    tl.store(LOSS + rows, loss_rows * scale, mask=row_mask)


@triton.jit
def _gram_grad_kernel(G, CS, GRAD, B, M, DS, g_row, cs_row, cs_col, out_row,
                      GRAD_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """GRAD[rows, ds] = G[rows, :]·C^s[:, ds] for many landmarks (G in a scratch of the compute dtype)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < B
    d_mask = ds < DS
    acc_type = G.dtype.element_ty
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=acc_type)
    for m_start in range(0, M, BLOCK_M):
        lm = m_start + tl.arange(0, BLOCK_M)
        lm_mask = lm < M
        g = tl.load(G + rows[:, None] * g_row + lm[None, :], mask=row_mask[:, None] & lm_mask[None, :], other=0.0)
        c = tl.load(CS + lm[:, None] * cs_row + ds[None, :] * cs_col,
                    mask=lm_mask[:, None] & d_mask[None, :], other=0.0).to(acc_type)
        acc = tl.dot(g, c, acc, input_precision=GRAD_PRECISION)
    tl.store(GRAD + rows[:, None] * out_row + ds[None, :], acc.to(GRAD.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


def launch_config(dtype: torch.dtype, num_landmarks: int, max_fused_m: int = MAX_FUSED_M) -> dict:
    """Constexprs for an input dtype: fp32 and fp64 inputs use exact products ("ieee", not TF32,
    since R = S^s − S^t cancels); fp16/bf16 multiply natively on a GPU (products exact in fp32) and
    upcast under the interpreter; G·C^s (G in fp32) uses TF32 there, below the output's rounding."""
    half = dtype in (torch.float16, torch.bfloat16)
    fused = num_landmarks <= max_fused_m
    return dict(FUSED_GRAD=fused, UPCAST=INTERPRETED or not half,
                PRECISION="tf32" if half and not INTERPRETED else "ieee",
                GRAD_PRECISION="tf32" if half and not INTERPRETED else "ieee",
                BLOCK_B=BLOCK_B, BLOCK_M=_tile(num_landmarks, max_fused_m) if fused else 64,
                BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)


@kernel_op("kdfast::triton_landmark_gram")
def triton_landmark_gram(fs: torch.Tensor, teacher_gram: torch.Tensor, cs: torch.Tensor, scale: torch.Tensor,
                         kind: str, beta: float, max_fused_m: int, compute_grad: bool = True,
                         wide_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss sums [B], ∂/∂F^s [B, d_s]) of the residual F^s·C^sᵀ − teacher_gram, both
    multiplied by the scalar tensor ``scale``; teacher_gram, scale and the loss rows are in the
    compute dtype (fp64 for fp64 inputs, else fp32); the gradient as in ``_common.gradient_output``."""
    rows, dim = fs.shape
    landmarks = cs.shape[0]
    loss = torch.empty(rows, dtype=teacher_gram.dtype, device=fs.device)
    grad, grad_arg = gradient_output(fs, compute_grad, wide_grad)
    if rows == 0:
        return loss, grad
    if landmarks == 0 or dim == 0:
        return loss.zero_(), grad.zero_()
    meta = launch_config(fs.dtype, landmarks, max_fused_m)
    fused = meta["FUSED_GRAD"]
    scratch = grad_arg if fused or not compute_grad else \
        torch.empty((rows, landmarks), dtype=teacher_gram.dtype, device=fs.device)
    launch(_gram_kernel, (triton.cdiv(rows, BLOCK_B),),
        fs, cs, teacher_gram, scale, loss, grad_arg, scratch, rows, landmarks, dim,
        fs.stride(0), fs.stride(1), cs.stride(0), cs.stride(1), teacher_gram.stride(0),
        grad.stride(0) if compute_grad else 0, scratch.stride(0) if compute_grad else 0, beta,
        KIND=GRAM_KIND_CODES[kind], HAS_GRAD=compute_grad, num_warps=gram_warps(meta["BLOCK_M"]), **meta)
    if compute_grad and not fused:
        launch(_gram_grad_kernel, (triton.cdiv(rows, BLOCK_B), triton.cdiv(dim, BLOCK_D)),
            scratch, cs, grad, rows, landmarks, dim, scratch.stride(0), cs.stride(0), cs.stride(1), grad.stride(0),
            GRAD_PRECISION=meta["GRAD_PRECISION"], BLOCK_B=BLOCK_B, BLOCK_M=meta["BLOCK_M"], BLOCK_D=BLOCK_D,
            num_warps=4)
    return loss, grad


def landmark_gram(fs: torch.Tensor, ft: torch.Tensor, cs: torch.Tensor, ct: torch.Tensor, kind: str, beta: float,
                  weight: float = 1.0, normalize: bool = False, eps: float = 0.0,
                  max_fused_m: int = MAX_FUSED_M, *, compute_grad: bool = True,
                  wide_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract's landmark-Gram kernel; ``max_fused_m`` caps the landmarks whose G tile stays
    in registers (tests force the scratch path with a small one). fp64 inputs are computed in fp64."""
    acc = accumulate_dtype(fs.dtype)
    # the teacher side: one matmul per batch in the compute dtype, no gradient
    teacher_gram = (ft.detach().to(acc) @ ct.detach().to(acc).T).contiguous()
    teacher_norm = torch.linalg.vector_norm(teacher_gram)
    scale = weight / (teacher_norm + eps) if normalize else torch.full((), weight, dtype=acc, device=fs.device)
    loss, grad = torch.ops.kdfast.triton_landmark_gram(fs, teacher_gram, cs.detach().to(fs.dtype), scale.to(acc),
                                                       kind, float(beta), int(max_fused_m), bool(compute_grad),
                                                       bool(wide_grad))
    return loss, grad, teacher_norm
