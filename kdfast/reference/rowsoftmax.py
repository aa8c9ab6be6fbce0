"""Reference of the row-softmax family (spec §0, §1, §4): KD, SKD, KD-pt, label smoothing,
instance re-weighted CE. Plain PyTorch, readable, float64-gradcheckable.

Inputs are 2-D [rows, classes] and already checked by :mod:`kdfast.functional`. Teacher logits
are constants: they are detached here, so no gradient ever reaches them.

Special values follow :mod:`kdfast.reference._common`: a −inf logit is a masked class
(probability 0, 0·log 0 = 0; a student −inf where the teacher has mass gives a +inf loss row,
and a −inf at the label gives CE = +inf), a NaN in a row's student or teacher logits makes that
row's loss and whole gradient row NaN, an ignored row has loss 0 and gradient 0 whatever it
holds. SKD normalises a row with its mean and spread, so there a −inf entry makes the row NaN.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import Rows, cross_entropy_rows, nan_where, prepare_rows, reduce_rows, soft_kl


def normalize_logits(logits: torch.Tensor, how: str, multiplier: float, eps: float) -> torch.Tensor:
    """SKD's projection of a logit row onto a sphere (spec §1a, §1f).

    - ``layernorm``: κ·(z − μ)/sqrt(var + eps), biased variance (the official SKD code).
    - ``l2``: κ·z/max(‖z‖, eps), no centring.
    - ``standardize``: κ·(z − μ)/(std + eps), unbiased std (logit standardisation); a row of
      one class has std 0.
    """
    if how == "layernorm":
        mean = logits.mean(dim=-1, keepdim=True)
        var = (logits - mean).pow(2).mean(dim=-1, keepdim=True)
        return multiplier * (logits - mean) / torch.sqrt(var + eps)
    if how == "l2":
        return multiplier * logits / logits.norm(dim=-1, keepdim=True).clamp_min(eps)
    if how == "standardize":
        num_classes = logits.shape[-1]
        mean = logits.mean(dim=-1, keepdim=True)
        var = (logits - mean).pow(2).sum(dim=-1, keepdim=True) / max(num_classes - 1, 1)
        # sqrt has an infinite slope at 0; a constant row has zero gradient there anyway.
        std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
        return multiplier * (logits - mean) / (std + eps)
    raise ValueError(f"normalize must be 'layernorm', 'l2' or 'standardize'; got {how!r}")


#: SKD's κ when none is given: the value each mode's published code uses (SKD: 2; logit
#: standardisation has no multiplier, i.e. 1)
SKD_DEFAULT_MULTIPLIERS = {"layernorm": 2.0, "l2": 2.0, "standardize": 1.0}


def default_skd_multiplier(normalize: str) -> float:
    """κ for ``multiplier=None``: :data:`SKD_DEFAULT_MULTIPLIERS` of the normalisation."""
    try:
        return SKD_DEFAULT_MULTIPLIERS[normalize]
    except KeyError:
        raise ValueError(f"normalize must be 'layernorm', 'l2' or 'standardize'; got {normalize!r}") from None


def _distill(rows: Rows, student: torch.Tensor, teacher: torch.Tensor, *, temperature: float,
             alpha: float, reduction: str, num_items_in_batch=None) -> torch.Tensor:
    """α·T²·KL(σ_T(teacher) ‖ σ_T(student)) + (1 − α)·CE(student, y), per row, then reduced."""
    log_p = F.log_softmax(student / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    per_row = alpha * temperature**2 * soft_kl(log_q, log_p)
    if alpha < 1:
        per_row = per_row + (1 - alpha) * cross_entropy_rows(F.log_softmax(student, dim=-1), rows.target)
    per_row = nan_where(per_row, rows.has_nan)
    return reduce_rows(per_row, rows.valid, reduction, mean_divisor=student.shape[-1],
                       num_items_in_batch=num_items_in_batch)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            target: Optional[torch.Tensor] = None, *, temperature: float = 4.0, alpha: float = 1.0,
            reduction: str = "batchmean", ignore_index: Optional[int] = -100,
            num_items_in_batch=None) -> torch.Tensor:
    """Hinton KD (spec §0): α·T²·KL(σ_T(z^t) ‖ σ_T(z^s)) + (1 − α)·CE(z^s, y)."""
    rows = prepare_rows(student_logits, teacher_logits, target, ignore_index)
    return _distill(rows, rows.student, rows.teacher, temperature=temperature, alpha=alpha, reduction=reduction,
                    num_items_in_batch=num_items_in_batch)


def skd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             target: Optional[torch.Tensor] = None, *, temperature: float = 4.0,
             multiplier: Optional[float] = None, alpha: float = 1.0, eps: float = 1e-7,
             normalize: str = "layernorm", reduction: str = "batchmean",
             ignore_index: Optional[int] = -100, num_items_in_batch=None) -> torch.Tensor:
    """Spherical KD (spec §1a): KD between the normalised logits h = κ·normalize(z) of both
    networks, with the CE term on the normalised student logits at T = 1. ``multiplier=None`` is
    κ = 2 for ``layernorm`` / ``l2`` and κ = 1 for ``standardize`` (:data:`SKD_DEFAULT_MULTIPLIERS`)."""
    multiplier = default_skd_multiplier(normalize) if multiplier is None else multiplier
    rows = prepare_rows(student_logits, teacher_logits, target, ignore_index)
    student = normalize_logits(rows.student, normalize, multiplier, eps)
    teacher = normalize_logits(rows.teacher, normalize, multiplier, eps)
    return _distill(rows, student, teacher, temperature=temperature, alpha=alpha, reduction=reduction,
                    num_items_in_batch=num_items_in_batch)


def partial_teacher_log_target(teacher_logits: torch.Tensor, target: torch.Tensor,
                               temperature: float) -> torch.Tensor:
    """log q^pt (spec §4a, §4c): the teacher's true-class probability ρ kept, 1 − ρ spread evenly
    over the other C − 1 classes. log(1 − ρ) comes from a log-sum-exp over the other classes, never
    from log(1 − exp(log ρ)), so it stays accurate as ρ → 1. When every other class is −inf,
    ρ = 1 and the other classes get probability 0."""
    scaled = teacher_logits / temperature
    num_classes = scaled.shape[-1]
    is_true = F.one_hot(target, num_classes).bool()
    log_total = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_rho = scaled.gather(-1, target.unsqueeze(-1)) - log_total
    log_rest = torch.logsumexp(scaled.masked_fill(is_true, -math.inf), dim=-1, keepdim=True) - log_total
    log_other = log_rest - math.log(max(num_classes - 1, 1))
    return torch.where(is_true, log_rho, log_other)


def partial_teacher_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
                         temperature: float = 1.0, alpha: float = 0.5, reduction: str = "batchmean",
                         ignore_index: Optional[int] = -100, num_items_in_batch=None) -> torch.Tensor:
    """KD-pt of Tang et al. (spec §4a): α·T²·KL(q^pt ‖ σ_T(z^s)) + (1 − α)·CE(z^s, y)."""
    rows = prepare_rows(student_logits, teacher_logits, target, ignore_index)
    log_q = partial_teacher_log_target(rows.teacher, rows.target, temperature)
    log_p = F.log_softmax(rows.student / temperature, dim=-1)
    per_row = alpha * temperature**2 * soft_kl(log_q, log_p)
    if alpha < 1:
        per_row = per_row + (1 - alpha) * cross_entropy_rows(F.log_softmax(rows.student, dim=-1), rows.target)
    per_row = nan_where(per_row, rows.has_nan)
    return reduce_rows(per_row, rows.valid, reduction, mean_divisor=rows.student.shape[-1],
                       num_items_in_batch=num_items_in_batch)


def label_smoothing_loss(student_logits: torch.Tensor, target: torch.Tensor, *, smoothing: float = 0.1,
                         reduction: str = "mean", ignore_index: Optional[int] = -100,
                         num_items_in_batch=None) -> torch.Tensor:
    """CE against t = (1 − ε)·e_y + (ε/C)·1 (spec §4a), as torch's cross_entropy(label_smoothing=ε)."""
    rows = prepare_rows(student_logits, None, target, ignore_index)
    log_p = F.log_softmax(rows.student, dim=-1)
    per_row = (1 - smoothing) * cross_entropy_rows(log_p, rows.target) - smoothing * log_p.mean(dim=-1)
    return reduce_rows(nan_where(per_row, rows.has_nan), rows.valid, reduction, mean_divisor=1,
                       num_items_in_batch=num_items_in_batch)


def reweighted_ce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
                       alpha: float = 0.5, temperature: float = 1.0, eps: float = 1e-6,
                       reduction: str = "mean", ignore_index: Optional[int] = -100,
                       num_items_in_batch=None) -> torch.Tensor:
    """Instance re-weighted CE (spec §4a): w_i·CE_i with the detached weight
    w_i = 1 − α·(1 − ρ_i)/max(1 − p_{y,i}, eps), ρ_i = σ_T(z^t_i)[y_i], p = σ(z^s_i).
    w is KD's true-logit gradient relative to CE's; it can be negative."""
    rows = prepare_rows(student_logits, teacher_logits, target, ignore_index)
    log_p = F.log_softmax(rows.student, dim=-1)
    ce = cross_entropy_rows(log_p, rows.target)
    with torch.no_grad():
        rho = F.softmax(rows.teacher / temperature, dim=-1)
        rho = rho.gather(-1, rows.target.unsqueeze(-1)).squeeze(-1)
        p_true = (-ce).exp()
        weight = 1 - alpha * (1 - rho) / (1 - p_true).clamp_min(eps)
    return reduce_rows(nan_where(weight * ce, rows.has_nan), rows.valid, reduction, mean_divisor=1,
                       num_items_in_batch=num_items_in_batch)
