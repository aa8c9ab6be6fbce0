"""What the three Triton kernel files share: the launch heuristics (one place, documented) and the
small @triton.jit helpers. Helpers live at module level because the interpreter resolves names
used inside a kernel from the module globals only."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

#: True when kernels run through the Triton interpreter (CPU tensors, numpy); read once, the
#: flag is also read by @triton.jit at import time, so it cannot change under a loaded module
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Row kernels (row-softmax, feature-centre): a row of up to MAX_SINGLE_BLOCK columns is held in
# registers and read from memory once; 8192 columns × 2 inputs at 16 warps is ≈ 32 fp32 values
# per thread per live vector, within the register file. Longer rows are streamed in blocks of
# STREAM_BLOCK columns (online max / log-sum-exp), 256k columns = 64 blocks.
MAX_SINGLE_BLOCK = 8192
STREAM_BLOCK = 4096


def row_block(num_columns: int, block_size: int | None = None) -> tuple[int, bool]:
    """(BLOCK, SINGLE): the column block and whether the whole row fits in it. ``block_size``
    forces a block (tests use a small one to exercise the streamed path)."""
    if block_size is None:
        whole = triton.next_power_of_2(max(num_columns, 1))
        block = whole if whole <= MAX_SINGLE_BLOCK else STREAM_BLOCK
    else:
        block = triton.next_power_of_2(max(int(block_size), 16))
    return block, block >= num_columns


def row_warps(block: int) -> int:
    """More warps for wider blocks so that each thread keeps ≤ ~32 values per vector."""
    if block <= 1024:
        return 4
    if block <= 4096:
        return 8
    return 16


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp16/bf16/fp32 inputs; fp64 inputs are computed in fp64 (the gradcheck path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def upcast(x, FP64: tl.constexpr):
    """Every load is upcast at once: the interpreter computes bf16 arithmetic on bit patterns."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def acc_zero(FP64: tl.constexpr):
    """A 0-d accumulator of the compute dtype (loop-carried values need a fixed type)."""
    if FP64:
        return tl.zeros([], dtype=tl.float64)
    else:
        return tl.zeros([], dtype=tl.float32)


def kernel_op(name: str):
    """Register a launcher as the custom op ``name`` (e.g. ``kdfast::triton_row_softmax``).

    On a GPU it is a ``torch.library.triton_op``: torch.compile sees the kernels inside (via
    ``wrap_triton``) and the launcher, run on fake tensors, is its own shape function. Under the
    interpreter ``wrap_triton`` hands back the plain interpreted kernel, which cannot be traced,
    so the op is an opaque ``custom_op`` there, with the launcher (launches skipped on fake
    tensors) as its fake implementation; torch.compile then calls it as one node."""
    def register(launcher):
        if not INTERPRETED:
            return triton_op(name, mutates_args={})(launcher)
        op = torch.library.custom_op(name, mutates_args=())(launcher)
        op.register_fake(launcher)
        return op
    return register


def launch(kernel, grid, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](...)``, except on fake tensors under the interpreter (shape
    propagation only: an interpreted kernel would try to read their data)."""
    if INTERPRETED and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def gradient_output(like: torch.Tensor, compute_grad: bool, wide_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the op's gradient output, the tensor the kernel writes): ``like``'s shape in its dtype (fp32 for
    half inputs when ``wide_grad``, so an upstream factor is applied before the one rounding), or,
    when only the loss is computed, an empty output and a one-element stand-in the kernel never
    writes (its HAS_GRAD constexpr is False)."""
    if not compute_grad:
        return like.new_empty(0), like.new_empty(1)
    dtype = torch.float32 if wide_grad and like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    grad = torch.empty(like.shape, dtype=dtype, device=like.device)
    return grad, grad


@triton.jit
def skip_row(y, ignore_index, num_classes, g_base, loss_ptr, num_columns, FP64: tl.constexpr, BLOCK: tl.constexpr,
             HAS_GRAD: tl.constexpr):
    """The contract's row action for a label: True (and the row written) when the row is not computed.
    An ignored row gets loss 0 and a zero gradient row; a label outside [0, num_classes) gets a NaN
    row (the wrappers have checked labels already: this only keeps a kernel from reading outside)."""
    skipped = (y == ignore_index) | (y < 0) | (y >= num_classes)
    if skipped:
        fill = tl.where(y == ignore_index, 0.0, float("nan"))
        if HAS_GRAD:
            lanes = tl.arange(0, BLOCK)
            for start in range(0, num_columns, BLOCK):
                cols = start + lanes
                tl.store(g_base + cols, (tl.zeros([BLOCK], dtype=tl.float32) + fill).to(g_base.dtype.element_ty),
                         mask=cols < num_columns)
        tl.store(loss_ptr, acc_zero(FP64) + fill)
    return skipped
