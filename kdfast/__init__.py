"""kdfast: fast, memory-lean knowledge-distillation losses.

Public API: the functional ops (also in :mod:`kdfast.functional`), the nn.Module losses and the
class-centre accumulator. ``kdfast.reference`` holds the plain-PyTorch specification;
``python -m kdfast.info`` reports the versions, the kernels' build and the backends per device.
"""
from . import _dispatch
from ._dispatch import ReferenceFallbackWarning, available_backends
from ._version import __version__
from .accumulators import ClassCenters
from .functional import (divergence_loss, kd_loss, l2rkd_loss, l2rkd_mix, label_smoothing_loss, nd_loss, nystrom_loss,
                         partial_teacher_loss, reweighted_ce_loss, skd_loss)
from .fused_linear import fused_linear_divergence_loss, fused_linear_kd_loss, fused_linear_skd_loss
from .modules import (DivergenceLoss, FusedLinearDivergenceLoss, FusedLinearKDLoss, FusedLinearSKDLoss, KDLoss, L2RKDLoss, LabelSmoothingLoss, NDLoss,
                      NystromLoss, PartialTeacherLoss, ReweightedCELoss, SKDLoss)
from .functional import topk_divergence_loss
from .fused_linear_topk import fused_linear_topk_divergence_loss
from .modules import FusedLinearTopKDivergenceLoss, TopKDivergenceLoss
from .reference.landmark_gram import nystrom_reconstruction
from .reference.rowsoftmax import normalize_logits

__all__ = [
    "kd_loss", "skd_loss", "partial_teacher_loss", "label_smoothing_loss", "reweighted_ce_loss", "nd_loss",
    "nystrom_loss", "l2rkd_loss", "l2rkd_mix", "nystrom_reconstruction", "normalize_logits", "fused_linear_kd_loss",
    "fused_linear_skd_loss", "FusedLinearKDLoss", "FusedLinearSKDLoss", "fused_linear_divergence_loss",
    "FusedLinearDivergenceLoss",
    "KDLoss", "SKDLoss", "PartialTeacherLoss", "LabelSmoothingLoss", "ReweightedCELoss", "NDLoss", "NystromLoss",
    "L2RKDLoss", "divergence_loss", "DivergenceLoss", "ClassCenters", "available_backends", "ReferenceFallbackWarning", "__version__",
    "topk_divergence_loss", "TopKDivergenceLoss", "fused_linear_topk_divergence_loss", "FusedLinearTopKDivergenceLoss",
]

# Import the backends that can serve this machine now, so that a step compiled with torch.compile
# finds them loaded (no import inside the traced region) even when it is the first kdfast call.
_dispatch.preload_backends()
