"""``backend="triton"``: the three kernel families as Triton kernels, launched through
``torch.library.triton_op`` (namespace ``kdfast``) so torch.compile traces them without a graph
break; autograd and reductions come from :mod:`kdfast.backends._fused`.

Runs on CUDA tensors, and on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is imported), which is how the CPU-only CI executes the real kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton  # noqa: F401  (an ImportError here tells the dispatcher that triton is missing)

from .._fused import build_losses
from ._common import INTERPRETED
from .feature_centre import feature_centre
from .landmark_gram import landmark_gram
from .rowsoftmax import row_softmax

LOSSES = build_losses(row_softmax, feature_centre, landmark_gram)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the kernels can run on tensors of ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return ("Triton kernels need CUDA tensors; CPU tensors run only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton), which is meant for tests")
    return f"Triton kernels run on CUDA tensors, not on {device.type} tensors"
