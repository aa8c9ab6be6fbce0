"""Per-class feature means: ND's teacher centres (spec §2a) and KDA's per-epoch landmarks (§3a).

Sums and counts are kept in fp32 / int64 whatever the feature dtype. Under torch.distributed the
ranks' sums and counts are all-reduced when the means are computed, so every rank gets the means
over the whole data set.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import _checks


class ClassCenters(nn.Module):
    """Accumulates per-class sums and counts of features; ``compute()`` returns the class means.

    >>> centres = ClassCenters(num_classes=10, dim=512)
    >>> for x, y in loader:
    ...     centres.update(teacher_features(x), y)
    >>> table = centres.compute()          # [10, 512] fp32, identical on every rank

    Rows labelled ``ignore_index`` are skipped. A class that received no sample has no mean:
    ``compute()`` raises (``empty="raise"``, the default) naming the classes, or returns zeros for
    them (``empty="zero"``); it never returns NaN.
    """

    def __init__(self, num_classes: int, dim: int, *, ignore_index: Optional[int] = -100,
                 device: Optional[torch.device] = None, process_group=None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        _checks.ignore_index(ignore_index)
        self.num_classes, self.dim, self.ignore_index = num_classes, dim, ignore_index
        self.process_group = process_group
        # Plain attributes, not buffers: DistributedDataParallel copies rank 0's buffers to every
        # rank before each training forward, which would overwrite the other ranks' running sums
        # (and count rank 0's twice at the all-reduce). They still move with .to() and live in the
        # state dict (see _apply and the state-dict hooks below).
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float32, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def _apply(self, fn, recurse=True):
        """Follow the module's moves (``.to(device)``, ``.cuda()``, ``share_memory()``) but never its
        dtype casts (``.half()``, ``.to(torch.bfloat16)``): the sums stay fp32, the counts int64. A
        cast result is discarded and the original sums are moved instead, so no value is rounded."""
        super()._apply(fn, recurse)
        moved = fn(self.sums)
        self.sums = moved if moved.dtype == torch.float32 else self.sums.to(moved.device)
        moved = fn(self.counts)
        self.counts = moved if moved.dtype == torch.int64 else self.counts.to(moved.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "sums"] = self.sums
        destination[prefix + "counts"] = self.counts

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("sums", "counts"):
            key = prefix + name
            if key in state_dict:
                getattr(self, name).copy_(state_dict.pop(key))
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    @torch.no_grad()
    def update(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of features [B, dim] with labels [B]."""
        _checks.tensor("features", features, ndim=2)
        if features.shape[1] != self.dim:
            raise ValueError(f"features must have {self.dim} columns (dim), got shape {tuple(features.shape)}")
        if features.device != self.sums.device:
            raise ValueError(f"features are on {features.device} but the accumulator is on {self.sums.device}; "
                             "move one of them (accumulator.to(device))")
        _checks.target("target", target, batch_shape=features.shape[:1], ref_name="features", ref=features,
                       num_classes=self.num_classes, ignore_index=self.ignore_index)
        target = target.long()
        keep = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        label = torch.where(keep, target, torch.zeros_like(target))
        weight = keep.to(torch.float32).unsqueeze(1)
        self.sums.index_add_(0, label, features.detach().to(torch.float32) * weight)
        self.counts.index_add_(0, label, keep.to(torch.int64))

    def _global_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums and counts over all ranks (copies: the local state is left as it is)."""
        sums, counts = self.sums.clone(), self.counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, group=self.process_group)
            dist.all_reduce(counts, group=self.process_group)
        return sums, counts

    def empty_classes(self) -> list[int]:
        """Classes that no rank has seen yet."""
        _, counts = self._global_state()
        return torch.nonzero(counts == 0).flatten().tolist()

    @torch.no_grad()
    def compute(self, empty: str = "raise") -> torch.Tensor:
        """Class means [num_classes, dim] in fp32. ``empty``: ``"raise"`` or ``"zero"``."""
        _checks.choice("empty", empty, ("raise", "zero"))
        sums, counts = self._global_state()
        missing = counts == 0
        if empty == "raise" and bool(missing.any()):
            classes = torch.nonzero(missing).flatten().tolist()
            shown = ", ".join(map(str, classes[:20])) + (", ..." if len(classes) > 20 else "")
            raise ValueError(f"{len(classes)} of {self.num_classes} classes received no sample, so they have no "
                             f"centre: {shown}. Feed data covering every class, or call compute(empty='zero').")
        return sums / counts.clamp_min(1).to(sums.dtype).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}"
