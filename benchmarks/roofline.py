"""Memory roofline: the device's copy bandwidth and the bytes each op must move at least.

Achieved bandwidth = ``min_bytes(...) / time``; the roofline fraction divides it by the copy
bandwidth measured in the same run with the same thread count. Shapes that fit in cache can beat
a DRAM copy, so fractions above 1 are possible for the smallest rows.
"""
from __future__ import annotations

from typing import Optional

import torch

from .timing import num_threads, time_fn

MODES = ("forward", "backward", "full")


def min_bytes(family: str, mode: str, shape: dict, itemsize: int) -> Optional[int]:
    """The fewest bytes an implementation of ``mode`` must read plus write; None where the op is
    not bandwidth-bound (the landmark-Gram family is two GEMMs: compute-bound).

    row-softmax, logits [N, V] (per-row statistics, labels and the scalar loss are negligible):
      * forward  — read student and teacher: 2·N·V·b
      * backward — write the gradient and read at least one N×V tensor (the gradient saved by a
        fused forward, or the student when recomputing): 2·N·V·b
      * full     — read student and teacher once, write the gradient once: 3·N·V·b
    feature–centre (ND), features [B, d], centres [C, d]:
      * forward  — read u and f^t, and the centre rows used (at most min(B, C) of them):
        (2·B + min(B, C))·d·b
      * backward — write the gradient, read one B×d tensor: 2·B·d·b
      * full     — forward's reads plus writing the gradient: (3·B + min(B, C))·d·b
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if family == "row-softmax":
        elements = shape["N"] * shape["V"]
        return {"forward": 2, "backward": 2, "full": 3}[mode] * elements * itemsize
    if family == "feature-centre":
        rows, dim, centres = shape["B"], shape["d"], min(shape["B"], shape["C"])
        return {"forward": 2 * rows + centres, "backward": 2 * rows,
                "full": 3 * rows + centres}[mode] * dim * itemsize
    return None


def copy_bandwidth(device: torch.device, nbytes: int, threads: int, min_run_time: float) -> float:
    """GB/s of ``dst.copy_(src)`` on a tensor far larger than any cache: (read + write) / time."""
    with num_threads(threads):
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch of the destination pages is not part of the copy
        p50, _, _ = time_fn(lambda: dst.copy_(src), device=device, threads=threads, min_run_time=min_run_time)
    del src, dst
    return 2 * nbytes / (p50 * 1e-3) / 1e9


def fresh_copy_bandwidth(device: torch.device, nbytes: int, threads: int, min_run_time: float) -> float:
    """GB/s of ``src.clone()``: a copy into freshly allocated memory, as every op that returns a
    new tensor (a gradient, say) must do. On machines where first-touch page faults are slow this
    is far below :func:`copy_bandwidth`; it is the practical ceiling for such ops."""
    with num_threads(threads):
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        p50, _, _ = time_fn(lambda: src.clone(), device=device, threads=threads, min_run_time=min_run_time)
    del src
    return 2 * nbytes / (p50 * 1e-3) / 1e9
