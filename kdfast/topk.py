"""Fused top-k teacher divergences in plain PyTorch ops: the closed-form gradient, written in the
forward, so that the backward only scales it.

The same code serves every device and every fused backend name ("auto", "cpu", "triton", "cuda"):
the work is one log-softmax of each student row over the vocabulary (in place), O(k) math on the
gathered values, and the dense gradient written in one pass over the row plus a scatter-add at the
k teacher indices. No kernel of a backend is needed. The definitions are those of
:mod:`kdfast.reference.topk`; with bins b ∈ K ∪ {R} (the tail R only for "bucket", "renormalize"
and "truncate") the gradient follows one template:

    ∂D/∂a_j = P_b(j)-weighted:  p_j · (g_b(j) − ḡ),   g_b = ∂D/∂P_b,   ḡ = Σ_b P_b g_b

where a = z'/T, so ∂D/∂z'_j = p_j (g_b(j) − ḡ) / T. Every tail entry shares g_R, so the tail's
gradient is p_j times one per-row number; the k entries of K get their own values. The reverse KL
with a floor (``tail="renormalize"``) is per entry on the tail: p_j (log p_j − λ − D).

:func:`topk_rows_` is the per-chunk function; :func:`topk_divergence_loss` (the fused backend of
:func:`kdfast.topk_divergence_loss`) and :mod:`kdfast.fused_linear_topk` both call it, so the
math is written once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .backends._fused import KernelLoss, Reduction, wants_gradient, wide_gradient
from .reference._common import compute_dtype, reduce_rows, valid_rows
from .reference.topk import BUCKET_DROP_MASS, canonical_divergence, log1mexp

#: rows of student logits processed at a time (elements per chunk ≈ 4M: 16 MiB of fp32 workspace)
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TopKOptions:
    """The per-call constants of the top-k math (checked by the public functions)."""
    divergence: str                  #: canonical: forward_kl, reverse_kl, mixed_kl, jsd
    tail: str
    beta: float
    mixed_kl_weight: float
    temperature: float
    ratio: float                     #: T_gen / T
    divergence_weight: float         #: α·(T² if t2_scaling)
    alpha: float
    reverse_kl_floor: Optional[float]
    logit_scale: float
    softcap: Optional[float]


def topk_options(*, divergence, beta, mixed_kl_weight, tail, temperature, teacher_temperature, t2_scaling, alpha,
                 reverse_kl_floor, student_logit_scale, student_softcap, **_unused) -> TopKOptions:
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    return TopKOptions(divergence=canonical_divergence(divergence, beta, mixed_kl_weight), tail=tail, beta=beta,
                       mixed_kl_weight=mixed_kl_weight, temperature=temperature,
                       ratio=teacher_temperature / temperature,
                       divergence_weight=alpha * (temperature**2 if t2_scaling else 1.0), alpha=alpha,
                       reverse_kl_floor=reverse_kl_floor, logit_scale=student_logit_scale,
                       softcap=student_softcap)


def row_weights(valid: torch.Tensor, reduction: str, vocab: int, num_items, dtype: torch.dtype) -> torch.Tensor:
    """d(reduced loss)/d(loss row), per row, as a device tensor (no host sync): folded into the
    gradient the forward writes, so that a plain ``loss.backward()`` needs no pass over it."""
    weight = valid.to(dtype)
    if num_items is not None and reduction == "batchmean":
        divisor = num_items.to(device=valid.device, dtype=dtype) if isinstance(num_items, torch.Tensor) \
            else float(num_items)
        return weight / divisor
    if reduction in ("batchmean", "mean"):
        count = valid.sum().clamp_min(1).to(dtype)
        return weight / (count * (vocab if reduction == "mean" else 1))
    return weight


def reduce_loss_rows(loss_rows: torch.Tensor, valid: torch.Tensor, reduction: str, vocab: int, num_items):
    """The public reduction of the per-row losses (as the reference)."""
    if num_items is not None and reduction == "batchmean":
        total = torch.where(valid, loss_rows, torch.zeros_like(loss_rows)).sum()
        if isinstance(num_items, torch.Tensor):
            return total / num_items.to(device=total.device, dtype=total.dtype)
        return total / num_items
    return reduce_rows(loss_rows, valid, reduction, mean_divisor=vocab)


# --- O(k) math on the gathered values -----------------------------------------------------------

def _xlogy_diff(x, log_x, log_y):
    """x·(log x − log y), 0 where x = 0 (decided before the difference: no 0·inf, no inf − inf)."""
    present = x > 0
    return torch.where(present, x * (log_x - log_y), torch.zeros_like(x))


def _exp(log_x):
    return None if log_x is None else log_x.exp()


def _log_mix(log_q, log_p, beta):
    """log(β·q + (1 − β)·p); −inf where both are −inf."""
    both = (log_q == -math.inf) & (log_p == -math.inf)
    mixed = torch.logaddexp(math.log(beta) + log_q.masked_fill(both, 0.0), math.log1p(-beta) + log_p.masked_fill(both, 0.0))
    return mixed.masked_fill(both, -math.inf)


def _sum_with_tail(values_k, value_tail):
    total = values_k.sum(dim=-1)
    return total if value_tail is None else total + value_tail


def bins_forward_kl(log_p_k, log_q_k, log_p_tail, log_q_tail):
    """Σ_b Q_b (log Q_b − log P_b) and its gradient template: per bin P_b(g_b − ḡ) on K, g_R − ḡ for
    the tail (which multiplies each tail p_j). g_b = −Q_b/P_b, ḡ = −Σ_b Q_b."""
    q_k = log_q_k.exp()
    q_tail = _exp(log_q_tail)
    loss = _sum_with_tail(_xlogy_diff(q_k, log_q_k, log_p_k),
                          None if q_tail is None else _xlogy_diff(q_tail, log_q_tail, log_p_tail))
    q_total = _sum_with_tail(q_k, q_tail)
    grad_k = log_p_k.exp() * q_total.unsqueeze(-1) - q_k
    if q_tail is None:  # no tail bin (renormalize, truncate): g_R = 0, so g_R − ḡ = Σ_K Q_i
        return loss, grad_k, q_total
    # p_j·Q_R/P_R on the tail: Q_R·e^{a_j − lse_R} ≤ Q_R; an empty student tail (P_R = 0) has no p_j to scale
    p_tail = log_p_tail.exp()
    ratio = torch.where(p_tail > 0, q_tail / torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail)),
                        torch.zeros_like(p_tail))
    return loss, grad_k, q_total - ratio


def bins_reverse_kl(log_p_k, log_q_k, log_p_tail, log_q_tail):
    """Σ_b P_b (log P_b − log Q_b); g_b − ḡ = log P_b − log Q_b − D (0 where P_b = 0)."""
    p_k = log_p_k.exp()
    p_tail = _exp(log_p_tail)
    loss = _sum_with_tail(_xlogy_diff(p_k, log_p_k, log_q_k),
                          None if p_tail is None else _xlogy_diff(p_tail, log_p_tail, log_q_tail))
    grad_k = _xlogy_diff(p_k, log_p_k, log_q_k + loss.unsqueeze(-1))
    if p_tail is None:
        return loss, grad_k, None
    tail = torch.where(p_tail > 0, log_p_tail - log_q_tail - loss, torch.zeros_like(loss))
    return loss, grad_k, tail


def bins_jsd(log_p_k, log_q_k, log_p_tail, log_q_tail, beta):
    """β·KL(Q‖M) + (1 − β)·KL(P‖M), M = βQ + (1 − β)P; g_b − ḡ = (1 − β)(log P_b − log M_b − KL(P‖M))."""
    log_m_k = _log_mix(log_q_k, log_p_k, beta)
    p_k, q_k = log_p_k.exp(), log_q_k.exp()
    log_m_tail = None if log_p_tail is None else _log_mix(log_q_tail, log_p_tail, beta)
    p_tail, q_tail = _exp(log_p_tail), _exp(log_q_tail)
    kl_pm = _sum_with_tail(_xlogy_diff(p_k, log_p_k, log_m_k),
                           None if p_tail is None else _xlogy_diff(p_tail, log_p_tail, log_m_tail))
    kl_qm = _sum_with_tail(_xlogy_diff(q_k, log_q_k, log_m_k),
                           None if q_tail is None else _xlogy_diff(q_tail, log_q_tail, log_m_tail))
    loss = beta * kl_qm + (1 - beta) * kl_pm
    grad_k = (1 - beta) * _xlogy_diff(p_k, log_p_k, log_m_k + kl_pm.unsqueeze(-1))
    if p_tail is None:
        return loss, grad_k, None
    tail = torch.where(p_tail > 0, (1 - beta) * (log_p_tail - log_m_tail - kl_pm), torch.zeros_like(loss))
    return loss, grad_k, tail


def bins_divergence(form, log_p_k, log_q_k, log_p_tail, log_q_tail, beta, mixed_kl_weight):
    """(loss [n], P_i(g_i − ḡ) [n, k], g_R − ḡ [n] or None) of a divergence over the bins."""
    if form == "forward_kl":
        return bins_forward_kl(log_p_k, log_q_k, log_p_tail, log_q_tail)
    if form == "reverse_kl":
        return bins_reverse_kl(log_p_k, log_q_k, log_p_tail, log_q_tail)
    if form == "jsd":
        return bins_jsd(log_p_k, log_q_k, log_p_tail, log_q_tail, beta)
    w = mixed_kl_weight
    forward, reverse = (bins_forward_kl(log_p_k, log_q_k, log_p_tail, log_q_tail),
                        bins_reverse_kl(log_p_k, log_q_k, log_p_tail, log_q_tail))
    loss = w * forward[0] + (1 - w) * reverse[0]
    grad_k = w * forward[1] + (1 - w) * reverse[1]
    tail = None if reverse[2] is None else w * forward[2] + (1 - w) * reverse[2]
    return loss, grad_k, tail


# --- one chunk of rows ------------------------------------------------------------------------

def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, in place on CPU (the kernel finishes each row's max and
    sum before writing it); elsewhere into a new tensor."""
    if x.device.type == "cpu":
        try:
            return torch.ops.aten._log_softmax.out(x, -1, False, out=x)
        except RuntimeError:  # a build that refuses the aliasing
            pass
    return torch.log_softmax(x, dim=-1)


def _zero_at(values: torch.Tensor, indices: torch.Tensor, real: torch.Tensor) -> None:
    """values[row, i] = 0 at the real indices, in place; a padding entry multiplies by 1, so it
    changes nothing even where its index repeats a real one (the product is order-independent)."""
    values.scatter_reduce_(1, indices, (~real).to(values.dtype), "prod")


def topk_rows_(buffer: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, target: Optional[torch.Tensor],
               valid: torch.Tensor, weight: torch.Tensor, opts: TopKOptions, compute_grad: bool) -> torch.Tensor:
    """The top-k loss of a chunk of rows, and its gradient written into ``buffer``.

    ``buffer`` [n, V] (compute dtype, contiguous) holds the raw student logits z and is overwritten:
    with ``compute_grad`` it holds ``weight_n · ∂ℓ_n/∂z`` on return (ℓ the per-row loss, ``weight``
    [n] d(reduced loss)/dℓ_n, 0 on ignored rows). ``indices`` [n, k] int64 (any value where the
    log-prob is −inf), ``logprobs`` [n, k], ``target`` [n] int64 with ignored rows as 0 (or None),
    ``valid`` [n] bool. Returns ℓ [n] (0 on ignored rows, NaN on NaN or undefined rows).
    """
    n, vocab = buffer.shape
    dtype = buffer.dtype
    neg_inf = -math.inf
    real = (logprobs > neg_inf) & valid.unsqueeze(-1)
    indices = torch.where(real, indices, torch.zeros_like(indices))
    logprobs = logprobs.to(dtype)
    ell = logprobs.masked_fill(~real, neg_inf)
    bad = valid & logprobs.isnan().any(dim=-1)           # a NaN teacher value poisons its row
    if opts.tail in ("renormalize", "renormalize_both"):
        bad = bad | (valid & ~real.any(dim=-1))           # no teacher entry to renormalise: undefined
    if buffer.device.type != "cpu" or not bool(valid.all()):
        buffer.masked_fill_(~valid.unsqueeze(-1), 0.0)     # ignored rows compute from harmless zeros

    # z' = c·tanh(s·z/c) (−inf stays −inf) or s·z; the chain factor is applied to the gradient at the end
    chain = None
    if opts.softcap is not None:
        masked = buffer == neg_inf
        buffer.mul_(opts.logit_scale / opts.softcap).tanh_()
        chain = buffer.clone() if compute_grad else None
        buffer.mul_(opts.softcap).masked_fill_(masked, neg_inf)
        del masked
    elif opts.logit_scale != 1.0:
        buffer.mul_(opts.logit_scale)
    s = 1.0 if opts.softcap is not None else opts.logit_scale  # folded into the weights when no softcap

    temperature = opts.temperature
    kd = weight * (opts.divergence_weight * s / temperature)     # per-row factor of ∂D/∂a
    ce = weight * ((1 - opts.alpha) * s)                          # per-row factor of the CE gradient
    want_ce = opts.alpha < 1
    ce_loss = None
    ce_probs = None                                               # softmax(z') when T ≠ 1
    if want_ce and temperature != 1.0:
        log_probs_1 = torch.log_softmax(buffer, dim=-1)
        ce_loss = -log_probs_1.gather(1, target.unsqueeze(-1)).squeeze(-1)
        ce_probs = log_probs_1.exp_() if compute_grad else None
        del log_probs_1
    form, tail = opts.divergence, opts.tail
    floor = tail == "renormalize" and form in ("reverse_kl", "mixed_kl")

    if tail in ("renormalize", "renormalize_both"):
        log_q_k = torch.log_softmax(opts.ratio * ell, dim=-1)     # q̃; NaN when K is empty (undefined row)
    else:
        log_q_k = ell

    if tail == "renormalize_both":
        # p̃ over K only: no pass over the vocabulary for the divergence
        student_k = buffer.gather(1, indices) / temperature
        log_p_k = torch.log_softmax(student_k.masked_fill(~real, neg_inf), dim=-1).masked_fill(~real, neg_inf)
        loss, grad_k, _ = bins_divergence(form, log_p_k, log_q_k, None, None, opts.beta, opts.mixed_kl_weight)
        bad = bad | (valid & (buffer.amax(dim=-1).isnan() | loss.isnan()))
        if want_ce:
            if ce_loss is None:                                   # T = 1: buffer is z'
                log_probs_1 = _log_softmax_(buffer)
                ce_loss = -log_probs_1.gather(1, target.unsqueeze(-1)).squeeze(-1)
                ce_probs = log_probs_1.exp_() if compute_grad else None
            if compute_grad:
                buffer = ce_probs.mul_(ce.unsqueeze(-1)) if ce_probs.data_ptr() == buffer.data_ptr() \
                    else buffer.copy_(ce_probs).mul_(ce.unsqueeze(-1))
        elif compute_grad:
            buffer.zero_()
        tail_factor = None
    else:
        if temperature != 1.0:
            buffer.mul_(1.0 / temperature)
        log_p = _log_softmax_(buffer)                             # log p over the vocabulary (NaN rows stay NaN)
        log_p_k = log_p.gather(1, indices).masked_fill(~real, neg_inf)
        if want_ce and ce_loss is None:                           # T = 1: log p is the CE's log-softmax
            ce_loss = -log_p.gather(1, target.unsqueeze(-1)).squeeze(-1)
        if floor:
            # per entry on the tail: p_j (log p_j − λ − RKL_λ); needs log p and p together
            log_p.nan_to_num_(nan=math.nan, neginf=0.0)           # p_j = 0 there: 0·log p_j must be 0
            probs = log_p.exp()
            _zero_at(probs, indices, real)
            tail_mass = probs.sum(dim=-1)
            tail_entropy = torch.linalg.vecdot(probs, log_p)        # Σ_R p_j log p_j
            forward = bins_forward_kl(log_p_k, log_q_k, None, None)
            reverse_k = _xlogy_diff(log_p_k.exp(), log_p_k, log_q_k)
            reverse = reverse_k.sum(dim=-1) + tail_entropy - opts.reverse_kl_floor * tail_mass
            reverse_grad_k = _xlogy_diff(log_p_k.exp(), log_p_k, log_q_k + reverse.unsqueeze(-1))
            w = 1.0 if form == "reverse_kl" else 1 - opts.mixed_kl_weight
            loss = w * reverse if w == 1.0 else opts.mixed_kl_weight * forward[0] + w * reverse
            grad_k = w * reverse_grad_k + (1 - w) * forward[1]
            # tail: p_j·(w·log p_j + w·(−λ − RKL_λ) + (1 − w)·(g_R − ḡ)_forward)
            tail_factor = w * (-opts.reverse_kl_floor - reverse) + (1 - w) * forward[2]
            log_factor = w
        else:
            need_tail_mass = tail == "bucket" or form == "jsd"     # the forward KL's tail factor needs no P_R
            probs = log_p.exp_()
            _zero_at(probs, indices, real)
            log_p_tail = log_q_tail = None
            if need_tail_mass:
                log_p_tail = probs.sum(dim=-1).log()                # the tail accumulated directly
                if tail == "bucket":
                    log_q_tail = log1mexp(torch.logsumexp(ell, dim=-1))
                    drop = (log_p_tail == neg_inf) & (log_q_tail <= math.log(BUCKET_DROP_MASS))
                    log_q_tail = log_q_tail.masked_fill(drop, neg_inf)
                else:
                    log_q_tail = torch.full_like(log_p_tail, neg_inf)
            loss, grad_k, tail_factor = bins_divergence(form, log_p_k, log_q_k, log_p_tail, log_q_tail,
                                                        opts.beta, opts.mixed_kl_weight)
            log_factor = 0.0
        bad = bad | (valid & loss.isnan())

    loss_rows = loss * opts.divergence_weight if opts.divergence_weight != 0 else torch.zeros_like(loss)
    if want_ce:
        loss_rows = loss_rows + (1 - opts.alpha) * ce_loss
    nan = torch.full((), math.nan, dtype=dtype, device=buffer.device)
    loss_rows = torch.where(bad, nan, torch.where(valid, loss_rows, torch.zeros_like(loss_rows)))
    if not compute_grad:
        return loss_rows

    if opts.divergence_weight == 0:
        grad_k = torch.zeros_like(grad_k)
        tail_factor = None if tail_factor is None else torch.zeros_like(tail_factor)
    values_k = kd.unsqueeze(-1) * grad_k
    if tail_factor is not None:
        row_factor = kd * tail_factor
        if want_ce and ce_probs is None:                           # T = 1: the CE's softmax is p itself
            row_factor = row_factor + ce
            values_k = values_k + ce.unsqueeze(-1) * log_p_k.exp()
        row_factor = torch.where(valid, row_factor, torch.zeros_like(row_factor))
        row_factor = torch.where(bad, nan, row_factor)
        if floor:
            # buffer holds log p (finite where p > 0, 0 where p = 0): G = p ⊙ (w·kd·log p + kd·tail_factor [+ ce])
            grad = log_p.mul_((kd * log_factor).unsqueeze(-1)).add_(row_factor.unsqueeze(-1)).mul_(probs)
            del probs
        else:
            grad = probs.mul_(row_factor.unsqueeze(-1))
    else:
        grad = buffer
        if grad.device.type != "cpu" or bool(bad.any()):
            grad.masked_fill_(bad.unsqueeze(-1), math.nan)
    values_k = torch.where(real, values_k, torch.zeros_like(values_k))
    values_k = torch.where(bad.unsqueeze(-1), nan, values_k)
    grad.scatter_add_(1, indices, values_k)
    if want_ce:
        if ce_probs is not None and tail_factor is not None:
            grad.addcmul_(ce_probs, ce.unsqueeze(-1))
        grad.scatter_add_(1, target.unsqueeze(-1), (-ce).unsqueeze(-1))
    if chain is not None:
        # ∂z'/∂z = s·(1 − tanh²(s·z/c))
        grad.mul_(chain.mul_(chain).mul_(-opts.logit_scale).add_(opts.logit_scale))
    if grad.data_ptr() != buffer.data_ptr():
        buffer.copy_(grad)
    return loss_rows


# --- topk_divergence_loss on [N, V] logits ------------------------------------------------------

def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _kernel(student, indices, logprobs, target, valid, weight, opts, *, compute_grad, wide_grad):
    """(loss rows [N], weighted gradient [N, V] or None), a chunk of rows at a time. For fp32 and
    fp64 inputs the chunks of the gradient itself are the workspace; otherwise a chunk of the
    compute dtype is, and its result is rounded into the gradient."""
    rows, vocab = student.shape
    work_dtype = compute_dtype(student.dtype)
    grad_dtype = work_dtype if wide_grad else student.dtype
    grad = torch.empty((rows, vocab), dtype=grad_dtype, device=student.device) if compute_grad else None
    loss_rows = torch.empty(rows, dtype=work_dtype, device=student.device)
    step = _chunk_rows(vocab)
    workspace = None
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        if grad is not None and grad.dtype == work_dtype:
            buffer = grad[start:stop]
        else:
            if workspace is None:
                workspace = torch.empty((min(step, rows), vocab), dtype=work_dtype, device=student.device)
            buffer = workspace[: stop - start]
        buffer.copy_(student[start:stop])
        chunk_target = None if target is None else target[start:stop]
        loss_rows[start:stop] = topk_rows_(buffer, indices[start:stop], logprobs[start:stop], chunk_target,
                                           valid[start:stop], weight[start:stop], opts, compute_grad)
        if grad is not None and buffer.data_ptr() != grad[start:stop].data_ptr():
            grad[start:stop].copy_(buffer)
    return loss_rows, grad


def topk_divergence_loss(student_logits: torch.Tensor, teacher_topk_indices: torch.Tensor,
                         teacher_topk_logprobs: torch.Tensor, target: Optional[torch.Tensor] = None,
                         **options) -> torch.Tensor:
    """The fused path of :func:`kdfast.topk_divergence_loss` on checked 2-D inputs ([N, V], [N, k],
    [N, k], [N] or None) with the reference's keyword options. Plain PyTorch ops: the same code runs
    for every fused backend name and every device. The gradient (scaled by the reduction) is
    computed in the forward; backward multiplies it by the upstream gradient only."""
    opts = topk_options(**options)
    reduction, num_items = options["reduction"], options.get("num_items_in_batch")
    rows, vocab = student_logits.shape
    target = None if target is None else target.long()
    valid, safe_target = valid_rows(target, options["ignore_index"], rows, student_logits.device)
    dtype = compute_dtype(student_logits.dtype)
    weight = row_weights(valid, reduction, vocab, num_items, dtype)
    indices = teacher_topk_indices.long()
    logprobs = teacher_topk_logprobs.detach()

    def reduce(loss_rows):
        return reduce_loss_rows(loss_rows.to(dtype), valid, reduction, vocab, num_items)

    arguments = (indices, logprobs, safe_target, valid, weight, opts)
    if wants_gradient(student_logits):
        output, = KernelLoss.apply(student_logits, Reduction(reduce, 1.0, reduction == "none"), _kernel, *arguments)
        return output
    loss_rows, _ = _kernel(student_logits.detach(), *arguments, compute_grad=False, wide_grad=False)
    return reduce(loss_rows)
