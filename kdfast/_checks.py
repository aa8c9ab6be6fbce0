"""Argument checks shared by every public op: one place, one wording.

Each check raises ``ValueError`` (bad value or shape) or ``TypeError`` (bad dtype) and names the
argument, so that a user reading the message knows which tensor to look at.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

ROW_REDUCTIONS = ("none", "sum", "mean", "batchmean")
ND_REDUCTIONS = ("none", "sum", "mean")
NYSTROM_KINDS = ("smooth_l1", "fro", "sq_fro")
SKD_NORMALIZATIONS = ("layernorm", "l2", "standardize")
DIVERGENCES = ("forward_kl", "reverse_kl", "mixed_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")


#: the class-count bound of a vocabulary-parallel rank's local label and index checks: the labels are
#: global, and the real bound (the global vocabulary size) is checked once it has been reduced
UNBOUNDED_CLASSES = 1 << 62


def tensor(name: str, value, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
           floating: bool = True) -> None:
    """A floating tensor of the right rank."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")


def same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but {ref_name} has shape "
                         f"{tuple(ref.shape)}; they must match")


def same_dtype_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; "
                         "they must be on the same device")
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has dtype {ref.dtype}; "
                        "they must match")


def target(name: str, value, *, batch_shape: Sequence[int], ref_name: str, ref: torch.Tensor,
           num_classes: int, ignore_index: Optional[int]) -> None:
    """Integer class labels of shape ``batch_shape`` in [0, num_classes) or equal to ignore_index.

    The range check needs the values: on CPU it raises at once; on an accelerator (or while
    torch.compile traces) it becomes a device-side assertion so that no host sync is forced.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(value).__name__}")
    if value.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must hold integer class indices, got dtype {value.dtype}")
    if tuple(value.shape) != tuple(batch_shape):
        raise ValueError(f"{name} must have shape {tuple(batch_shape)} (the rows of {ref_name}), "
                         f"got {tuple(value.shape)}")
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; "
                         "they must be on the same device")
    if value.numel() == 0:
        return
    valid = (value >= 0) & (value < num_classes)
    if ignore_index is not None:
        valid = valid | (value == ignore_index)
    message = (f"{name} holds a label outside [0, {num_classes}) that is not "
               f"ignore_index={ignore_index}")
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(valid.all()):
            bad = value[~valid][0].item()
            raise ValueError(f"{message} (found {bad})")
    else:
        torch._assert_async(valid.all(), message)


#: the range of an int64 label, which an ignore_index must lie in to be compared with labels
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def ignore_index(value, name: str = "ignore_index") -> None:
    """None (no row ignored) or a Python int that an int64 label can equal."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must lie in the int64 range [-2**63, 2**63 - 1] of the labels, got {value}")


def optional_positive(name: str, value) -> None:
    if value is not None:
        positive(name, value)


def choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def positive(name: str, value) -> None:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def non_negative(name: str, value) -> None:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def in_unit_interval(name: str, value) -> None:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def positive_int(name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def unit_interval_open_above(name: str, value) -> None:
    """A Python number in [0, 1)."""
    in_unit_interval(name, value)
    if value == 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")


def num_items_in_batch(value, reduction: str, device: Optional[torch.device] = None,
                       name: str = "num_items_in_batch") -> None:
    """None, a Python number > 0, or a 0-dim real tensor (its value is not read: no host sync) on
    ``device`` or the CPU; it replaces the "batchmean" divisor, so only that reduction takes it."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a Python number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must hold a real number, got dtype {value.dtype}")
        if device is not None and value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the inputs are on {device}; "
                             "they must be on the same device")
    else:
        positive(name, value)
    if reduction != "batchmean":
        raise ValueError(f"{name} replaces the 'batchmean' divisor; it needs reduction='batchmean', "
                         f"got reduction={reduction!r}")


TOPK_DIVERGENCES = ("forward_kl", "reverse_kl", "mixed_kl", "jsd")
TOPK_TAILS = ("renormalize", "renormalize_both", "bucket", "truncate")


def optional_finite(name: str, value) -> None:
    """None or a finite Python number."""
    if value is None:
        return
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number or None, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def topk_teacher(indices, logprobs, *, batch_shape: Sequence[int], ref_name: str, ref: torch.Tensor,
                 num_classes: int, indices_name: str = "teacher_topk_indices",
                 logprobs_name: str = "teacher_topk_logprobs") -> None:
    """A top-k teacher: integer indices and floating log-probabilities of the same shape
    [*batch_shape, k], k ≥ 1, on ``ref``'s device; the indices of the real entries (log-prob > −inf)
    in [0, num_classes) (padding entries may hold any index). The range check raises at once on CPU
    and is a device-side assertion elsewhere (no host sync)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{indices_name} must be a torch.Tensor of vocabulary indices, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{indices_name} must hold integer vocabulary indices, got dtype {indices.dtype}")
    tensor(logprobs_name, logprobs)
    if indices.dim() != len(batch_shape) + 1 or tuple(indices.shape[:-1]) != tuple(batch_shape):
        raise ValueError(f"{indices_name} must have shape {tuple(batch_shape)} + (k,) (the rows of {ref_name}), "
                         f"got {tuple(indices.shape)}")
    if indices.shape[-1] == 0:
        raise ValueError(f"{indices_name} must have at least one entry per row (k >= 1)")
    if logprobs.shape != indices.shape:
        raise ValueError(f"{logprobs_name} has shape {tuple(logprobs.shape)} but {indices_name} has shape "
                         f"{tuple(indices.shape)}; they must match")
    for name, value in ((indices_name, indices), (logprobs_name, logprobs)):
        if value.device != ref.device:
            raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; "
                             "they must be on the same device")
    if indices.numel() == 0:
        return
    real = logprobs > -math.inf
    inside = (indices >= 0) & (indices < num_classes)
    ok = (inside | ~real).all()
    message = f"{indices_name} holds an index outside [0, {num_classes}) at an entry whose log-prob is not -inf"
    if indices.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            bad = indices[real & ~inside][0].item()
            raise ValueError(f"{message} (found {bad})")
    else:
        torch._assert_async(ok, message)
