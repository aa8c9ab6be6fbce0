"""Reference of the divergences against a sparse (top-k) teacher: per row the teacher is known only
through k (index, log-probability) pairs, computed over the full vocabulary at a generation
temperature T_gen; the student's logits are dense. Plain PyTorch, readable, float64-gradcheckable:
the gradients are autograd's, and the fused path (:mod:`kdfast.topk`) is tested against them.

Notation (one row): a = z'/T the student's transformed logits at temperature T, p = softmax(a)
over the whole vocabulary, K the indices whose log-probability ℓ is > −inf (padding entries carry
ℓ = −inf and their index is ignored, even when it repeats a real index), R = V ∖ K the tail.
The teacher's log-probabilities are re-tempered from T_gen to T and renormalised over K:

    log q̃_i = (T_gen/T)·ℓ_i − LSE_{j∈K}((T_gen/T)·ℓ_j)        (= softmax over K of z^t/T, exactly)

The ``tail`` modes:

* ``"renormalize"``: D(q̃ ‖ p) between the teacher renormalised over K (zero on R) and the full
  student, entry by entry over the vocabulary. The reverse KL is +inf whenever the student puts
  mass on R, so the reverse (and mixed) KL replace log q̃_j on R by the floor λ
  (``reverse_kl_floor``): RKL_λ = Σ_j p_j (log p_j − t_j), t_j = log q̃_j on K, λ on R.
* ``"renormalize_both"``: D between q̃ and p̃ = softmax over K of a (the tail is ignored).
* ``"bucket"``: D over k + 1 bins, the k singletons and the tail, with teacher masses Q_i = e^{ℓ_i},
  Q_R = 1 − Σ_K e^{ℓ_i} and student masses p_i, P_R = Σ_{j∈R} p_j (summed over R directly, not as
  1 − Σ_K p_i). A student tail that is empty (every tail logit −inf) drops a teacher tail of at
  most 1e-6 (rounding in the stored values); a larger one is a support violation (+inf).
* ``"truncate"``: Σ_{i∈K} e^{ℓ_i} (ℓ_i − log p_i), forward only; not a divergence (it is negative
  near its minimiser).

"bucket" and "truncate" use the stored probabilities themselves, which are correct only at the
temperature they were computed at: they need T_gen = T.

Special values as :mod:`kdfast.reference._common`: an ignored row has loss 0 and gradient 0; a NaN
in a row (student logits or teacher log-probabilities) makes its loss and whole gradient row NaN;
so does an undefined row: no real teacher entry under a renormalising mode, or a student whose
logits are all −inf (over K for "renormalize_both").
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._common import _NanRowsPropagate, cross_entropy_rows, nan_where, prepare_rows, reduce_rows
from .divergence import divergence_rows, kl_terms, transform_logits

#: the ``divergence`` names a top-k teacher supports
TOPK_DIVERGENCES = ("forward_kl", "reverse_kl", "mixed_kl", "jsd")
#: the ``tail`` modes
TAILS = ("renormalize", "renormalize_both", "bucket", "truncate")
#: a teacher tail mass up to this is rounding when the student's tail is empty (the bucket is dropped)
BUCKET_DROP_MASS = 1e-6


def canonical_divergence(divergence: str, beta: float, mixed_kl_weight: float) -> str:
    """The endpoints of the families as the plain KLs: JSD(0) and mixed(w = 1) are the forward KL,
    JSD(1) and mixed(w = 0) the reverse KL."""
    if (divergence == "jsd" and beta == 0) or (divergence == "mixed_kl" and mixed_kl_weight == 1):
        return "forward_kl"
    if (divergence == "jsd" and beta == 1) or (divergence == "mixed_kl" and mixed_kl_weight == 0):
        return "reverse_kl"
    return divergence


def check_tail_options(divergence: str, tail: str, beta: float, mixed_kl_weight: float, temperature: float,
                       teacher_temperature: Optional[float], reverse_kl_floor: Optional[float]) -> None:
    """The combinations of options that have no meaning (ValueError naming the option)."""
    form = canonical_divergence(divergence, beta, mixed_kl_weight)
    if tail in ("bucket", "truncate") and teacher_temperature is not None and teacher_temperature != temperature:
        raise ValueError(f"tail={tail!r} uses the stored probabilities themselves, which are only known at the "
                         f"temperature they were computed at: it needs teacher_temperature == temperature "
                         f"(got teacher_temperature={teacher_temperature}, temperature={temperature}); "
                         "tail='renormalize' or 'renormalize_both' re-temper exactly")
    if tail == "truncate" and form != "forward_kl":
        raise ValueError(f"tail='truncate' is defined for the forward KL only; got divergence={divergence!r}")
    if tail == "renormalize" and form in ("reverse_kl", "mixed_kl") and reverse_kl_floor is None:
        raise ValueError(f"divergence={divergence!r} with tail='renormalize' is +inf wherever the student puts "
                         "mass outside the teacher's top-k: pass reverse_kl_floor (the log-probability the teacher "
                         "is given there; -100.0 as NeMo-RL), or use tail='renormalize_both' or 'bucket'")


def real_entries(logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bool [N, k]: the entries that belong to K (log-prob > −inf) in the counted rows."""
    return (logprobs > -math.inf) & valid.unsqueeze(-1)


def check_distinct(indices: torch.Tensor, real: torch.Tensor) -> None:
    """The real indices of a row must be distinct (padding may repeat anything)."""
    k = indices.shape[-1]
    if k < 2:
        return
    sentinel = -1 - torch.arange(k, device=indices.device)           # distinct and never a real index
    keyed = torch.where(real, indices.long(), sentinel).sort(dim=-1).values
    repeated = (keyed[:, 1:] == keyed[:, :-1]).any(dim=-1)
    if bool(repeated.any()):
        row = int(repeated.nonzero()[0, 0])
        raise ValueError(f"teacher_topk_indices repeats an index in row {row}; the real (finite log-prob) "
                         "indices of a row must be distinct")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x ≤ 0, accurate at both ends; −inf for x ≥ 0 (a top-k mass rounded up to ≥ 1)."""
    near_zero = x > -math.log(2.0)
    safe = torch.where(x < 0, x, torch.full_like(x, -1.0))
    value = torch.where(near_zero, torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe)))
    return torch.where(x < 0, value, torch.full_like(x, -math.inf))


def _masked_logsumexp(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """LSE over the entries in ``keep``; −inf (with a zero gradient, not NaN) when there are none or all
    are −inf."""
    values = values.masked_fill(~keep, -math.inf)
    empty = (values == -math.inf).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(torch.where(empty, torch.zeros_like(values), values), dim=-1)
    return torch.where(empty.squeeze(-1), torch.full_like(lse, -math.inf), lse)


def _dense(values: torch.Tensor, indices: torch.Tensor, real: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """[N, width] holding ``values`` at the real indices and ``fill`` elsewhere (teacher side: no
    gradient; a padding index that repeats a real one cannot overwrite it)."""
    scattered = torch.full((values.shape[0], width), -math.inf, dtype=values.dtype, device=values.device)
    scattered = scattered.scatter_reduce(1, indices, values.masked_fill(~real, -math.inf), "amax")
    in_k = torch.zeros_like(scattered).scatter_add(1, indices, real.to(values.dtype)) > 0
    return torch.where(in_k, scattered, torch.full_like(scattered, fill))


def topk_divergence_rows(log_p: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, real: torch.Tensor, *,
                         divergence: str, tail: str, beta: float, mixed_kl_weight: float, ratio: float,
                         reverse_kl_floor: Optional[float]) -> torch.Tensor:
    """The per-row divergence of a top-k teacher (no T², no α, no reduction). ``log_p`` [N, V] is the
    student's log-softmax at T; ``indices`` [N, k] int64 in range; ``real`` marks K; ``ratio`` = T_gen/T."""
    form = canonical_divergence(divergence, beta, mixed_kl_weight)
    ell = logprobs.masked_fill(~real, -math.inf)
    log_p_k = log_p.gather(1, indices).masked_fill(~real, -math.inf)
    options = dict(beta=beta, mixed_kl_weight=mixed_kl_weight)
    width = log_p.shape[-1]
    if tail in ("renormalize", "renormalize_both"):
        log_q_k = F.log_softmax(ratio * ell, dim=-1)                         # q̃ (NaN when K is empty)
    if tail == "renormalize_both":
        log_p_tilde = F.log_softmax(log_p_k, dim=-1)                         # p̃: p renormalised over K
        return divergence_rows(log_p_tilde, log_q_k, form, **options)
    if tail == "renormalize":
        log_q = _dense(log_q_k, indices, real, width, -math.inf)           # q̃ on K, 0 elsewhere
        if form in ("forward_kl", "jsd"):
            return divergence_rows(log_p, log_q, form, **options)
        floored = _dense(log_q_k, indices, real, width, float(reverse_kl_floor))
        reverse = kl_terms(log_p.exp(), log_p, floored)                      # RKL_λ, per entry
        if form == "reverse_kl":
            return reverse
        return mixed_kl_weight * kl_terms(log_q.exp(), log_q, log_p) + (1 - mixed_kl_weight) * reverse
    if tail == "truncate":
        return kl_terms(ell.exp(), ell, log_p_k)
    # bucket: k + 1 bins
    in_k = torch.zeros_like(log_p).scatter_add(1, indices, real.to(log_p.dtype)) > 0
    log_p_tail = _masked_logsumexp(log_p, ~in_k)
    log_q_tail = log1mexp(torch.logsumexp(ell, dim=-1))
    drop = (log_p_tail == -math.inf) & (log_q_tail <= math.log(BUCKET_DROP_MASS))
    log_q_tail = log_q_tail.masked_fill(drop, -math.inf)
    log_p_bins = torch.cat([log_p_k, log_p_tail.unsqueeze(-1)], dim=-1)
    log_q_bins = torch.cat([ell, log_q_tail.unsqueeze(-1)], dim=-1)
    return divergence_rows(log_p_bins, log_q_bins, form, **options)


def topk_divergence_loss(student_logits: torch.Tensor, teacher_topk_indices: torch.Tensor,
                         teacher_topk_logprobs: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                         divergence: str = "forward_kl", beta: float = 0.5, mixed_kl_weight: float = 0.5,
                         tail: str = "renormalize", temperature: float = 1.0,
                         teacher_temperature: Optional[float] = None, t2_scaling: bool = False, alpha: float = 1.0,
                         reverse_kl_floor: Optional[float] = None, reduction: str = "batchmean",
                         num_items_in_batch: Union[None, int, float, torch.Tensor] = None,
                         ignore_index: Optional[int] = -100, student_logit_scale: float = 1.0,
                         student_softcap: Optional[float] = None) -> torch.Tensor:
    """Per row: α·(T² if t2_scaling)·D + (1 − α)·CE(z'^s, y), with D the divergence between the
    top-k teacher and the student under the chosen ``tail`` mode (module docstring), z' the student's
    logits after its scale and softcap, the CE term at T = 1. Inputs are 2-D ([N, V], [N, k], [N, k])
    and checked; reductions as :func:`kdfast.reference.divergence.divergence_loss`.
    """
    rows = prepare_rows(student_logits, teacher_topk_logprobs, target, ignore_index)
    vocab = student_logits.shape[-1]
    real = real_entries(rows.teacher, rows.valid)
    check_distinct(teacher_topk_indices, real)
    indices = torch.where(real, teacher_topk_indices.long(), torch.zeros_like(teacher_topk_indices, dtype=torch.long))
    ratio = (temperature if teacher_temperature is None else teacher_temperature) / temperature

    student = transform_logits(rows.student, student_logit_scale, student_softcap)
    # Undefined rows (module docstring): loss NaN and whole gradient row NaN, like a NaN row.
    with torch.no_grad():
        undefined = torch.zeros_like(rows.valid)
        if tail in ("renormalize", "renormalize_both"):
            undefined |= ~real.any(dim=-1)
        if tail == "renormalize_both":
            undefined |= ~(real & (student.gather(1, indices) > -math.inf)).any(dim=-1)
        else:
            undefined |= (student == -math.inf).all(dim=-1)
        undefined &= rows.valid
    student = _NanRowsPropagate.apply(student, undefined)

    log_p = F.log_softmax(student / temperature, dim=-1)
    per_row = torch.zeros_like(log_p[:, 0])
    if alpha > 0:                                        # α = 0 drops the term (no 0·inf)
        scale = alpha * (temperature**2 if t2_scaling else 1.0)
        per_row = per_row + scale * topk_divergence_rows(
            log_p, indices, rows.teacher, real, divergence=divergence, tail=tail, beta=beta,
            mixed_kl_weight=mixed_kl_weight, ratio=ratio, reverse_kl_floor=reverse_kl_floor)
    if alpha < 1:
        per_row = per_row + (1 - alpha) * cross_entropy_rows(F.log_softmax(student, dim=-1), rows.target)
    per_row = nan_where(per_row, rows.has_nan | undefined)
    if num_items_in_batch is not None and reduction == "batchmean":
        total = torch.where(rows.valid, per_row, torch.zeros_like(per_row)).sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            return total / num_items_in_batch.to(dtype=total.dtype)
        return total / num_items_in_batch
    return reduce_rows(per_row, rows.valid, reduction, mean_divisor=vocab)
