"""The specification in plain PyTorch: one file per kernel family.

These functions take checked 2-D tensors; the public, checked entry points are in
:mod:`kdfast.functional`. Tests and benchmarks use exactly these functions as the baseline.
"""
from .divergence import divergence_loss
from .feature_centre import nd_loss, unit_centers
from .landmark_gram import nystrom_loss, nystrom_reconstruction
from .rowsoftmax import (kd_loss, label_smoothing_loss, normalize_logits, partial_teacher_log_target,
                         partial_teacher_loss, reweighted_ce_loss, skd_loss)
from .topk import topk_divergence_loss

#: The implementations the dispatcher knows as ``backend="reference"``.
LOSSES = {
    "kd_loss": kd_loss,
    "skd_loss": skd_loss,
    "partial_teacher_loss": partial_teacher_loss,
    "label_smoothing_loss": label_smoothing_loss,
    "reweighted_ce_loss": reweighted_ce_loss,
    "nd_loss": nd_loss,
    "nystrom_loss": nystrom_loss,
    "divergence_loss": divergence_loss,
    "topk_divergence_loss": topk_divergence_loss,
}

#: losses only the reference implements so far (the fused backends come later): "auto" runs them
#: with the reference without reporting a fallback
REFERENCE_ONLY = frozenset({
    # its fused path is plain PyTorch for every device (kdfast/topk.py), dispatched by
    # kdfast.functional.topk_divergence_loss itself: no kernel backend lists it
    "topk_divergence_loss",
})
