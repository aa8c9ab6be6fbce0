"""backend="cuda": hand-written CUDA kernels of the three families (csrc/cuda/*.cu, CUDA headers
only, launched over raw pointers on torch's current stream).

They are the CUDA implementations of the same ``torch.ops.kdfast`` operators as the CPU backend:
the schemas and fake implementations come from ``kdfast._C`` / :mod:`kdfast.backends.cpu`, and
``kdfast._C_cuda`` (built only against a CUDA build of torch) adds the CUDA kernels, so the
operator wrappers are shared and the dispatcher picks the kernel from the tensors' device.
"""
from __future__ import annotations

from typing import Optional

import torch  # before the extensions: they need libtorch's shared libraries loaded

from ._fused import build_losses

if torch.version.cuda is None:
    raise ImportError("backend 'cuda' needs a CUDA build of torch; this one is CPU-only")

from .cpu import feature_centre, landmark_gram, row_softmax  # noqa: E402  (schemas, fakes, wrappers)

try:
    from .. import _C_cuda  # noqa: F401,E402  (loading it registers the CUDA kernels)
except ImportError as error:
    raise ImportError(
        "kdfast's CUDA extension (kdfast._C_cuda) is missing or does not load "
        f"({error}); it is built by `pip install --no-build-isolation -e .` when torch has CUDA and "
        "nvcc is on PATH") from error


def unavailable_reason(device: torch.device) -> Optional[str]:
    device = torch.device(device)
    if device.type != "cuda":
        return f"its kernels run on CUDA tensors only, not on {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


LOSSES = build_losses(row_softmax, feature_centre, landmark_gram)
