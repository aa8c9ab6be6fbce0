"""Reference of the LLM-distillation divergences (llm-distillation spec §0–§5, §7, §9): forward
KL, reverse KL, mixed KL, generalized JSD(β), TVD, skew KL and skew reverse KL between the
tempered student and teacher distributions of each row. Plain PyTorch, readable,
float64-gradcheckable: the gradients are autograd's, and the closed forms of the spec (and the
fused kernels, later) are tested against them.

Inputs are 2-D [rows, vocabulary] and already checked by :mod:`kdfast.functional`. Teacher logits
are constants (detached).

Special values follow :mod:`kdfast.reference._common` and spec §0.3: a −inf logit is a masked
entry (probability 0); every term x·(log x − log y) with x = 0 is 0 whatever y is, and that is
decided on x == 0 *before* any difference of logarithms is formed, so no 0·(−inf) or
(−inf) − (−inf) appears in the values or the gradients. x > 0 with y = 0 is a support violation:
the row's loss is +inf (its gradient is not specified). A NaN in a row makes its loss and its
whole gradient row NaN; an ignored row has loss 0 and gradient 0 whatever it holds.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._common import _NanRowsPropagate, cross_entropy_rows, nan_where, prepare_rows, reduce_rows

#: the ``divergence`` names, in the spec's order
DIVERGENCES = ("forward_kl", "reverse_kl", "mixed_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")


def transform_logits(logits: torch.Tensor, scale: float, softcap: Optional[float]) -> torch.Tensor:
    """Spec §7: z' = c·tanh(s·z/c) (softcap c) or z' = s·z (no softcap), applied before the
    temperature. A −inf logit stays −inf (the mask is applied after the transform: c·tanh(−inf)
    would be the finite −c)."""
    if scale != 1.0:
        logits = logits * scale
    if softcap is None:
        return logits
    capped = softcap * torch.tanh(logits / softcap)
    return torch.where(logits == -math.inf, logits, capped)


def kl_terms(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(x ‖ y) = Σ_j x_j (log x_j − log y_j), with the term taken as 0 wherever x_j = 0
    (a masked entry or an underflow), decided before the difference is formed: at those entries
    both logarithms are replaced by 0 first, so neither the value nor the gradient sees a NaN.
    x_j > 0 with log y_j = −inf gives +inf."""
    absent = x == 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    log_x = torch.where(absent, zero, log_x)
    log_y = torch.where(absent, zero, log_y)
    return torch.where(absent, zero, x * (log_x - log_y)).sum(dim=-1)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q) for 0 < w < 1, by logaddexp. Entries masked on both sides (p = q = 0)
    are fed zeros instead of (−inf, −inf), whose logaddexp has a NaN derivative; their value is
    never used (every KL term there has x = 0)."""
    both_absent = (log_p == -math.inf) & (log_q == -math.inf)
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    log_p = torch.where(both_absent, zero, log_p)
    log_q = torch.where(both_absent, zero, log_q)
    return torch.logaddexp(math.log(weight_p) + log_p, math.log1p(-weight_p) + log_q)


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, *, beta: float = 0.5,
                    skew_alpha: float = 0.1, mixed_kl_weight: float = 0.5) -> torch.Tensor:
    """The per-row divergence between the student p = exp(log_p) and the teacher q = exp(log_q)
    (spec §1–§5; no temperature, no T², no reduction)."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":                       # §1: KL(q ‖ p)
        return kl_terms(q, log_q, log_p)
    if divergence == "reverse_kl":                       # §2: KL(p ‖ q)
        return kl_terms(p, log_p, log_q)
    if divergence == "mixed_kl":                         # §2b: w·KL(q ‖ p) + (1 − w)·KL(p ‖ q)
        loss = torch.zeros_like(log_p[..., 0])           # a weight of 0 drops its term (no 0·inf)
        if mixed_kl_weight > 0:
            loss = loss + mixed_kl_weight * kl_terms(q, log_q, log_p)
        if mixed_kl_weight < 1:
            loss = loss + (1 - mixed_kl_weight) * kl_terms(p, log_p, log_q)
        return loss
    if divergence == "jsd":                              # §3: β weights the TEACHER in the mixture
        if beta == 0:
            return kl_terms(q, log_q, log_p)
        if beta == 1:
            return kl_terms(p, log_p, log_q)
        log_m = log_mixture(log_q, log_p, beta)          # m = β·q + (1 − β)·p
        return beta * kl_terms(q, log_q, log_m) + (1 - beta) * kl_terms(p, log_p, log_m)
    if divergence == "tvd":                              # §4: ½ Σ |p − q| (subgradient 0 at ties)
        return 0.5 * (p - q).abs().sum(dim=-1)
    if divergence == "skew_forward_kl":                  # §5: KL(q ‖ α·q + (1 − α)·p)
        if skew_alpha == 0:
            return kl_terms(q, log_q, log_p)
        return kl_terms(q, log_q, log_mixture(log_q, log_p, skew_alpha))
    if divergence == "skew_reverse_kl":                  # §5: KL(p ‖ (1 − α)·q + α·p)
        if skew_alpha == 0:
            return kl_terms(p, log_p, log_q)
        return kl_terms(p, log_p, log_mixture(log_p, log_q, skew_alpha))
    raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}; got {divergence!r}")


def divergence_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    target: Optional[torch.Tensor] = None, *, divergence: str = "forward_kl", beta: float = 0.5,
                    skew_alpha: float = 0.1, mixed_kl_weight: float = 0.5, temperature: float = 1.0,
                    t2_scaling: bool = False, alpha: float = 1.0, reduction: str = "batchmean",
                    num_items_in_batch: Union[None, int, float, torch.Tensor] = None,
                    ignore_index: Optional[int] = -100, student_logit_scale: float = 1.0,
                    student_softcap: Optional[float] = None, teacher_logit_scale: float = 1.0,
                    teacher_softcap: Optional[float] = None) -> torch.Tensor:
    """Per row: α·(T² if t2_scaling)·D(p, q) + (1 − α)·CE(z'^s, y), with z' the logits after each
    model's scale and softcap (§7), p = softmax(z'^s/T), q = softmax(z'^t/T) and D the chosen
    divergence (§1–§5). ``kd_loss(T, α)`` equals ``divergence="forward_kl", t2_scaling=True``.

    Reductions as ``kd_loss`` (``batchmean`` over the counted rows, ``mean`` also over V);
    ``num_items_in_batch`` (a number or a 0-dim tensor) replaces the ``batchmean`` divisor (§9).
    """
    rows = prepare_rows(student_logits, teacher_logits, target, ignore_index)
    # A row wholly −inf on either side has no distribution: loss NaN and whole gradient row NaN, for
    # every form (autograd alone would give TVD's |·| a zero gradient there).
    with torch.no_grad():
        undefined = rows.valid & ((rows.student == -math.inf).all(dim=-1) | (rows.teacher == -math.inf).all(dim=-1))
    student = transform_logits(_NanRowsPropagate.apply(rows.student, undefined), student_logit_scale, student_softcap)
    teacher = transform_logits(rows.teacher, teacher_logit_scale, teacher_softcap)
    log_p = F.log_softmax(student / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    per_row = torch.zeros_like(log_p[..., 0])
    if alpha > 0:                                        # α = 0 drops the term (no 0·inf)
        scale = alpha * (temperature**2 if t2_scaling else 1.0)
        per_row = per_row + scale * divergence_rows(log_p, log_q, divergence, beta=beta, skew_alpha=skew_alpha,
                                                    mixed_kl_weight=mixed_kl_weight)
    if alpha < 1:
        per_row = per_row + (1 - alpha) * cross_entropy_rows(F.log_softmax(student, dim=-1), rows.target)
    per_row = nan_where(per_row, rows.has_nan | undefined)
    return reduce_rows(per_row, rows.valid, reduction, mean_divisor=student.shape[-1],
                       num_items_in_batch=num_items_in_batch)
