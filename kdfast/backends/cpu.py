"""backend="cpu": the C++ kernels of the three families (csrc/cpu/, vectorised with ATen's at::vec,
one build per instruction set chosen at run time, rows split over threads with at::parallel_for).

The kernels are the ``torch.ops.kdfast`` operators registered by the compiled extension
``kdfast._C``; this module translates the kernel contract of :mod:`kdfast.backends._contract`
(its code tables) into their flat arguments, registers their fake (meta) implementations so
``torch.compile`` traces them without a graph break, and gets the seven public losses from
``build_losses``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch  # before the extension: it needs libtorch's shared libraries loaded

from .._build import load_cpu_extension
from ._contract import (DIVERGENCE_CODES, GRAM_KIND_CODES, NO_IGNORE_INDEX, NORMALIZE_CODES, TEACHER_CODES,
                        RowSoftmaxParams)
from ._fused import build_losses

# The kernels register torch.ops.kdfast.*: the extension installed with the package, or the one
# compiled for this torch on first use and cached (an ImportError saying why otherwise; the
# dispatcher reports it and falls back to the reference).
load_cpu_extension()


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gradient_fake(student: torch.Tensor, compute_grad: bool, wide_grad: bool) -> torch.Tensor:
    """The gradient output: contiguous like the input, fp32 for half inputs when wide, empty when
    only the loss is computed."""
    if not compute_grad:
        return student.new_empty(0)
    dtype = torch.float32 if wide_grad and student.dtype in (torch.float16, torch.bfloat16) else student.dtype
    return torch.empty_like(student, dtype=dtype, memory_format=torch.contiguous_format)


def _register_fakes(namespace: str = "kdfast") -> None:
    """Shapes and dtypes of the kernels' outputs, for tracing (torch.compile, FakeTensor)."""

    @torch.library.register_fake(f"{namespace}::row_softmax")
    def _row_softmax_fake(student, teacher, target, normalize, multiplier, eps, temperature, teacher_mode,
                          kl_weight, ce_weight, uniform_weight, reweight, reweight_alpha, reweight_eps,
                          ignore_index, compute_grad=True, wide_grad=False, divergence=0, divergence_param=0.0):
        return (student.new_empty(student.shape[0], dtype=_loss_dtype(student.dtype)),
                _gradient_fake(student, compute_grad, wide_grad))

    @torch.library.register_fake(f"{namespace}::feature_centre")
    def _feature_centre_fake(student, teacher, target, centres, eps, ignore_index, compute_grad=True,
                             wide_grad=False):
        return (student.new_empty(student.shape[0], dtype=_loss_dtype(student.dtype)),
                _gradient_fake(student, compute_grad, wide_grad))

    @torch.library.register_fake(f"{namespace}::landmark_gram")
    def _landmark_gram_fake(student_features, teacher_features, student_landmarks, teacher_landmarks, kind, beta,
                            weight, normalize, eps, compute_grad=True, wide_grad=False):
        dtype = _loss_dtype(student_features.dtype)
        return (student_features.new_empty(student_features.shape[0], dtype=dtype),
                _gradient_fake(student_features, compute_grad, wide_grad),
                student_features.new_empty((), dtype=dtype))


_register_fakes()


def row_softmax(student: torch.Tensor, teacher: Optional[torch.Tensor], target: Optional[torch.Tensor],
                params: RowSoftmaxParams, *, compute_grad: bool = True, wide_grad: bool = False):
    return torch.ops.kdfast.row_softmax(
        student, teacher, target, NORMALIZE_CODES[params.normalize], float(params.multiplier), float(params.eps),
        float(params.temperature), TEACHER_CODES[params.teacher], float(params.kl_weight), float(params.ce_weight),
        float(params.uniform_weight), bool(params.reweight), float(params.reweight_alpha),
        float(params.reweight_eps), int(params.ignore_index), bool(compute_grad), bool(wide_grad),
        DIVERGENCE_CODES[params.divergence], float(params.divergence_param))


def feature_centre(u: torch.Tensor, teacher_features: torch.Tensor, target: torch.Tensor, centers: torch.Tensor,
                   eps: float, ignore_index: int = NO_IGNORE_INDEX, *, compute_grad: bool = True,
                   wide_grad: bool = False):
    """ND per row; rows whose label equals ``ignore_index`` get loss 0 and a zero gradient row, the
    other labels must lie in [0, num_centres). Narrower integer labels are widened to int64."""
    return torch.ops.kdfast.feature_centre(u, teacher_features, target.long(), centers, float(eps), int(ignore_index),
                                           bool(compute_grad), bool(wide_grad))


def landmark_gram(student_features: torch.Tensor, teacher_features: torch.Tensor, student_landmarks: torch.Tensor,
                  teacher_landmarks: torch.Tensor, kind: str, beta: float, weight: float = 1.0, normalize: bool = False,
                  eps: float = 0.0, *, compute_grad: bool = True, wide_grad: bool = False):
    return torch.ops.kdfast.landmark_gram(student_features, teacher_features, student_landmarks, teacher_landmarks,
                                          GRAM_KIND_CODES[kind], float(beta), float(weight), bool(normalize),
                                          float(eps), bool(compute_grad), bool(wide_grad))


def capability() -> str:
    """The instruction-set build the row kernels use here: "avx512", "avx2" or "default"."""
    return torch.ops.kdfast.cpu_capability()


def set_gradient_reuse(enabled: bool) -> bool:
    """Let the row kernels hand out their previous big gradient block again once nothing refers to
    it (what ``KDFAST_CPU_REUSE_GRADIENT=1`` sets at start-up), or stop; returns the previous setting.
    Saves the OS's zeroing of fresh pages on every step, at the cost of up to two gradient-sized
    blocks kept between steps (:func:`kept_gradient_bytes`; :func:`release_kept_gradients` drops them)."""
    return bool(torch.ops.kdfast.cpu_set_gradient_reuse(bool(enabled)))


@contextlib.contextmanager
def gradient_reuse(enabled: bool = True):
    """``set_gradient_reuse(enabled)`` for the block, the previous setting restored after it (kept
    blocks stay kept: the next block that reuses them finds them)."""
    previous = set_gradient_reuse(enabled)
    try:
        yield
    finally:
        set_gradient_reuse(previous)


def kept_gradient_bytes() -> int:
    """Bytes of the gradient blocks kept for reuse now (idle or still in use)."""
    return int(torch.ops.kdfast.cpu_kept_gradient_bytes())


def release_kept_gradients() -> None:
    """Drop the kept blocks (one a live gradient still uses is freed with that gradient)."""
    torch.ops.kdfast.cpu_release_kept_gradients()


def unavailable_reason(device: torch.device) -> Optional[str]:
    if torch.device(device).type != "cpu":
        return f"its kernels run on CPU tensors only, not on {torch.device(device).type}"
    return None


LOSSES = build_losses(row_softmax, feature_centre, landmark_gram)
