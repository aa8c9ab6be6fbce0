"""Vocabulary-parallel (tensor-parallel) row losses on torch.distributed.

Each rank of a process group holds a contiguous block of columns of every logit row (Megatron's
vocabulary-parallel LM head: rank r owns the columns [start_r, start_r + V_r)). A row loss is
computed without gathering the rows, by one rule for every form:

    a loss row is a function G of a few **row sums over the vocabulary**, σ = Σ_j f(z_j).

Each rank computes the sums over its columns, the sums are added across ranks with one
``all_reduce`` of a stacked [rows, m] tensor, and every rank evaluates G redundantly. The gradient
stays local: by the chain rule ∂ℓ/∂z_j = Σ_i (∂G/∂σ_i)·(∂f_i/∂z_j), and ∂f_i/∂z_j involves only the
rank's own column j. Autograd gives both factors (∂G/∂σ on the reduced sums, the vector-Jacobian
product of the local sums on the local columns), so no collective runs in the backward.

Some forms need a second **level** of sums that depend on the first level's totals (the JSD's
mixture needs the normalised probabilities). Level 2's local sums are then functions of z and of
the level-1 totals Γ₁; the total derivative of ℓ with respect to Γ₁ picks up Σ_j ∂f₂/∂Γ₁, itself a
sum over the vocabulary, so those Jacobian sums (a few numbers per row) travel in level 2's
all-reduce. The number of collectives per call is therefore: one MAX of the row maxima (the shift
that keeps every exp(z − M) finite), plus one SUM per level:

=====================================  ===================  =============================
form                                   collectives          what the SUM(s) carry per row
=====================================  ===================  =============================
forward KL, reverse KL, mixed KL, KD   MAX + SUM       (2)  S_s, S_t, W [, S_1, z_y]
JSD(β), TVD, skew KLs                  MAX + SUM + SUM (3)  S_s, S_t [, S_1, z_y]; share, ∂share/∂S_s
SKD (layernorm, l2, standardize)       (MAX ∥ SUM) + SUM    Σz, Σz², V; then as forward KL
top-k (any tail)                       MAX + SUM       (2)  S_s, a_K (k values), S_R [, E_R]
top-k "renormalize_both", α = 1        SUM             (1)  a_K
=====================================  ===================  =============================

(``[, S_1, z_y]``: the (1 − α)·CE term's sum-exp at T = 1 and the label's logit, contributed by its
owner and 0 elsewhere; also two extra columns per row: NaN counts and the local width.) The
forward KL needs no second level because Σ_j q_j(b_j − a_j) = W/S_t with W = Σ_j e^{b_j − M_t}(b_j − a_j)
can be summed at the global max before S_t is known.

Semantics equal the single-process losses: masked (−inf) columns, NaN rows (a NaN on any rank
makes the row NaN everywhere), ignored rows, every reduction and ``num_items_in_batch``. Every
rank returns the same loss; count it once.

This path is plain PyTorch ops on the local columns, a chunk of rows at a time (bounded
temporaries; one pass for the maxima, one per level, one for the gradient, each recomputing the
chunk's elementwise terms): its point is the communication, O(rows) values per collective, never
the [rows, V] logits. Its arithmetic is not a fused kernel: on one CPU thread, kd_loss at
2048 × 16000 fp32 takes about 1 s here against 0.06 s for the single-process fused kernel.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..backends._contract import canonical_divergence as dense_canonical_divergence
from ..reference._common import compute_dtype, mask_rows, valid_rows
from ..reference.divergence import divergence_rows, kl_terms, transform_logits
from ..reference.topk import BUCKET_DROP_MASS, canonical_divergence, check_distinct, log1mexp
from ..topk import reduce_loss_rows, row_weights

__all__ = ["VocabShard", "vocab_shard", "record_collectives", "RowForm", "DenseDivergence", "Spherical",
           "TopK", "form_for", "parallel_rows", "vocab_parallel_loss"]

NEG_INF = -math.inf


# --- the group and its collectives ---------------------------------------------------------------

@dataclass(frozen=True)
class VocabShard:
    """This rank's block of vocabulary columns in a tensor-parallel group."""
    group: object                    #: the torch.distributed process group (None: the default group)
    start: int                       #: global index of the first local column
    size: int                        #: number of local columns

    @property
    def stop(self) -> int:
        return self.start + self.size


def vocab_shard(group, vocab_start_index: Optional[int], local_size: int, name: str = "vocab_start_index") -> VocabShard:
    """The shard of the calling rank; ``vocab_start_index=None`` means equal shards in rank order
    (Megatron's padded vocabulary): start = rank·V_local."""
    if group is None:
        raise ValueError("vocab_start_index needs vocab_parallel_group (the tensor-parallel process group)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_group needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    if vocab_start_index is None:
        start = dist.get_rank(group) * local_size
    else:
        if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int) or vocab_start_index < 0:
            raise ValueError(f"{name} must be a non-negative int (the global index of this rank's first "
                             f"column), got {vocab_start_index!r}")
        start = vocab_start_index
    return VocabShard(group, start, local_size)


@dataclass
class CollectiveRecord:
    """One collective issued by this module: its reduction, shape and dtype."""
    op: str
    shape: tuple
    dtype: torch.dtype

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * torch.finfo(self.dtype).bits // 8


_RECORDERS: List[list] = []


@contextlib.contextmanager
def record_collectives():
    """Context manager yielding a list that receives a :class:`CollectiveRecord` for every
    collective the vocabulary-parallel losses issue inside it (their own count, used by the docs'
    communication table and checked by the tests against torch.distributed itself)."""
    log: list = []
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)


def _issue(tensor: torch.Tensor, op: str, group, async_op: bool = False):
    for log in _RECORDERS:
        log.append(CollectiveRecord(op, tuple(tensor.shape), tensor.dtype))
    reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    return dist.all_reduce(tensor, op=reduce_op, group=group, async_op=async_op)


def _all_reduce(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    tensor = tensor.contiguous()
    _issue(tensor, op, group)
    return tensor


def _all_reduce_max_and_sum(maxima: torch.Tensor, sums: torch.Tensor, group):
    """Two independent collectives issued together (one round trip)."""
    maxima, sums = maxima.contiguous(), sums.contiguous()
    works = [_issue(maxima, "max", group, async_op=True), _issue(sums, "sum", group, async_op=True)]
    for work in works:
        work.wait()
    return maxima, sums


# --- helpers on local columns --------------------------------------------------------------------

def row_max(x: torch.Tensor) -> torch.Tensor:
    """Row maxima of the local columns, detached; −inf for a rank without columns. A NaN maximum
    only occurs in a NaN row, which is NaN whatever its shift (:func:`finite_shift`)."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], NEG_INF)
    return x.detach().amax(dim=-1)


def finite_shift(m: torch.Tensor) -> torch.Tensor:
    """A global row maximum usable as a shift: 0 where it is not finite (a row that is −inf or NaN
    everywhere is undefined, and stays so, without inf − inf in the shift itself)."""
    return torch.where(m.isfinite(), m, torch.zeros_like(m))


def sum_exp(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Σ_j e^{x_j − shift} over the local columns."""
    return torch.exp(x - shift.unsqueeze(-1)).sum(dim=-1)


def weighted_difference(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j (x_j − y_j) with the term 0 where w_j = 0, decided before the difference is formed
    (no inf − inf in the value or the gradient); +inf where w_j > 0 and y_j = −inf."""
    present = weight > 0
    difference = torch.where(present, x - y, torch.zeros((), dtype=x.dtype, device=x.device))
    return (weight * difference).sum(dim=-1)


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x, −inf at 0, with a zero (not NaN) gradient there."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))),
                       torch.full((), NEG_INF, dtype=x.dtype, device=x.device))


def owned_values(x: torch.Tensor, global_index: torch.Tensor, shard: VocabShard, present: torch.Tensor) -> torch.Tensor:
    """x at the given global column indices where this rank owns them (and ``present``), 0 elsewhere:
    summed across ranks, each index gets exactly its owner's value."""
    local = global_index - shard.start
    owned = present & (local >= 0) & (local < shard.size)
    if shard.size == 0:
        return torch.zeros(global_index.shape, dtype=x.dtype, device=x.device)
    picked = x.gather(-1, torch.where(owned, local, torch.zeros_like(local)))
    return torch.where(owned, picked, torch.zeros((), dtype=x.dtype, device=x.device))


# --- the engine ----------------------------------------------------------------------------------

@dataclass
class Context:
    """What a form computes. The row context of a call holds per-row values only (``local``:
    shifts, top-k bookkeeping); a chunk context holds a block of rows of the local columns
    (``student`` the autograd leaf, ``teacher``) and the per-row values sliced to its rows."""
    student: Optional[torch.Tensor]
    teacher: Optional[torch.Tensor]
    target: Optional[torch.Tensor]   #: global labels, ignored rows as 0
    valid: torch.Tensor
    shard: VocabShard
    local: dict = field(default_factory=dict)

    def rows(self, block: slice, student, teacher) -> "Context":
        """The chunk context of rows ``block`` (per-row values sliced, column tensors given)."""
        local = {k: v[block] if isinstance(v, torch.Tensor) else v for k, v in self.local.items()}
        return Context(student, teacher, None if self.target is None else self.target[block], self.valid[block],
                       self.shard, local)


class RowForm:
    """A vocabulary-parallel row loss.

    * ``setup(ctx)``: per-row values of the whole call (row context).
    * ``prepare(chunk)``: the local quantities of a chunk (with autograd from ``chunk.student``).
    * ``maxima(chunk)``: the chunk's row maxima to MAX-reduce, or None (after ``prepare``).
    * ``after_max(ctx, maxima)``: store the reduced maxima (row context).
    * ``levels``: each returns ``(sums, constants)`` of a chunk's local columns — ``sums`` [n, m]
      differentiable, ``constants`` [n, c] not — given the chunk's rows of the previous levels'
      reduced totals.
    * ``loss(ctx, totals, constants)``: ℓ [N] from the reduced totals alone (row context).

    ``max_with_first_level``: the MAX needs none of the first level's totals and travels
    concurrently with it (SKD)."""
    max_with_first_level = False
    levels: Sequence[Callable] = ()

    def setup(self, ctx: Context) -> None:
        pass

    def prepare(self, ctx: Context) -> None:
        raise NotImplementedError

    def maxima(self, ctx: Context) -> Optional[torch.Tensor]:
        return None

    def after_max(self, ctx: Context, maxima: Optional[torch.Tensor]) -> None:
        ctx.local["max"] = None if maxima is None else finite_shift(maxima)

    def loss(self, ctx: Context, totals: list, constants: list) -> torch.Tensor:
        raise NotImplementedError


def _row_jacobians(sums: torch.Tensor, leaves: list) -> list:
    """[∂sums/∂leaf per row: [n, m, m_leaf]] for each leaf (rows are independent, so the gradient
    of a column's sum over rows is that column's per-row derivative)."""
    if not leaves or not sums.requires_grad:
        return [torch.zeros(sums.shape + leaf.shape[-1:], dtype=sums.dtype, device=sums.device) for leaf in leaves]
    columns = []
    for i in range(sums.shape[-1]):
        grads = torch.autograd.grad(sums[:, i].sum(), leaves, retain_graph=True, allow_unused=True)
        columns.append([torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)])
    return [torch.stack([col[k] for col in columns], dim=1) for k in range(len(leaves))]


#: elements of local columns per chunk of rows: the per-chunk temporaries (a few chunks' worth) are
#: reused by the allocator instead of a fresh [rows, V_r] tensor per operation
CHUNK_ELEMENTS = 1 << 21


def parallel_rows(form: RowForm, student: torch.Tensor, teacher: Optional[torch.Tensor], target: Optional[torch.Tensor],
                  ignore_index: Optional[int], shard: VocabShard, row_weight: Callable, *, compute_grad: bool,
                  grad_dtype: Optional[torch.dtype] = None):
    """Run ``form`` on local [N, V_r] columns. Returns (ℓ [N] in the compute dtype, 0 on ignored
    rows and NaN on NaN or undefined rows; the local gradient weighted by ``row_weight``, or None;
    the global vocabulary size as a 0-dim tensor).

    ``row_weight(vocab)`` gives d(reduced loss)/dℓ_n as an [N] tensor, from the global vocabulary
    size (a 0-dim tensor, known after the first level; no host synchronisation).

    The columns are visited a chunk of rows at a time, each pass recomputing the chunk's
    elementwise quantities: once for the maxima, once per level, once for the gradient. The
    collectives carry all the rows at once (one per level), so the chunking adds none."""
    dtype = compute_dtype(student.dtype)
    rows = student.shape[0]
    device = student.device
    valid, safe_target = valid_rows(target, ignore_index, rows, device)
    ctx = Context(None, None, safe_target, valid, shard)
    form.setup(ctx)
    step = max(1, CHUNK_ELEMENTS // max(shard.size, 1))
    # no rows: one empty block, so that every rank still computes (empty) sums and joins the collectives
    blocks = [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]
    student, teacher = student.detach(), None if teacher is None else teacher.detach()

    # ignored rows compute from zeros (masking costs a pass: skipped on CPU when every row counts)
    mask = device.type != "cpu" or not bool(valid.all())

    def chunk(block: slice, grad: bool, want_maxima: bool = False):
        """The chunk context of ``block`` with its local quantities (and its row maxima)."""
        leaf, part = student[block].to(dtype), None if teacher is None else teacher[block].to(dtype)
        if mask:
            leaf, part = mask_rows(leaf, valid[block]), mask_rows(part, valid[block])
        sub = ctx.rows(block, leaf.detach().requires_grad_(grad), part)
        form.prepare(sub)
        return sub, form.maxima(sub) if want_maxima else None

    def level_sums(sub: Context, level: int, block: slice, totals: list, constants: list):
        leaves = [t[block].detach().requires_grad_(t.requires_grad) for t in totals]
        sums, consts = form.levels[level](sub, leaves, [c[block] for c in constants])
        return sums, consts, leaves

    nan = torch.full((), math.nan, dtype=dtype, device=device)
    with torch.no_grad():
        maxima = None
        if not form.max_with_first_level:
            parts = [chunk(block, False, want_maxima=True)[1] for block in blocks]
            if parts and parts[0] is not None:
                maxima = torch.cat(parts) if len(parts) > 1 else parts[0]
                form.after_max(ctx, _all_reduce(maxima, "max", shard.group))
    totals, constants, jacobians = [], [], []
    nan_count = torch.zeros(rows, dtype=dtype, device=device)
    vocab = torch.full((), float(shard.size), dtype=dtype, device=device)
    for level in range(len(form.levels)):
        need_jacobians = compute_grad and level > 0
        packed_parts, first_maxima = [], []
        for block in blocks:
            with torch.enable_grad() if need_jacobians else torch.no_grad():
                first = level == 0
                sub, chunk_maxima = chunk(block, False, want_maxima=first and form.max_with_first_level)
                if first:
                    first_maxima.append(chunk_maxima)
                    # a row sum is NaN when the row holds a NaN (or both infinities: undefined too)
                    nan_count[block] = sub.student.detach().sum(dim=-1).isnan().to(dtype)
                    if sub.teacher is not None:
                        nan_count[block] += sub.teacher.sum(dim=-1).isnan().to(dtype)
                sums, consts, leaves = level_sums(sub, level, block, totals, constants)
                jac = _row_jacobians(sums, leaves) if need_jacobians else []
            packed_parts.append(torch.cat([sums.detach(), consts.to(sums.dtype)] + [j.flatten(1).to(sums.dtype) for j in jac],
                                           dim=-1))
        packed = torch.cat(packed_parts) if len(packed_parts) > 1 else packed_parts[0]
        if level == 0:  # NaN counts and the local width travel with the first level
            extra = [nan_count, torch.full((rows,), float(shard.size), dtype=packed.dtype, device=device)]
            packed = torch.cat([packed] + [e.to(packed.dtype).unsqueeze(-1) for e in extra], dim=-1)
        if level == 0 and form.max_with_first_level and first_maxima and first_maxima[0] is not None:
            maxima = torch.cat(first_maxima)
            reduced_max, packed = _all_reduce_max_and_sum(maxima, packed, shard.group)
            form.after_max(ctx, reduced_max)
        else:
            packed = _all_reduce(packed, "sum", shard.group)
        m, c = sums.shape[-1], consts.shape[-1]
        totals.append(packed[:, :m].clone().requires_grad_(compute_grad))
        constants.append(packed[:, m:m + c])
        offset = m + c
        reduced_jac = []
        for previous in totals[:-1] if need_jacobians else ():  # Jacobians only travel for a gradient
            size = m * previous.shape[-1]
            reduced_jac.append(packed[:, offset:offset + size].reshape(rows, m, previous.shape[-1]))
            offset += size
        jacobians.append(reduced_jac)
        if level == 0 and rows:
            nan_count, vocab = packed[:, offset], packed[0, offset + 1]

    with torch.enable_grad() if compute_grad else torch.no_grad():
        ell = form.loss(ctx, totals, constants)
    # a NaN input anywhere in the row, an undefined row (e.g. wholly −inf: its loss is NaN) → NaN row
    bad = valid & ((nan_count > 0) | ell.detach().isnan() | ctx.local.get("undefined", torch.zeros_like(valid)))
    ell_out = torch.where(bad, nan, torch.where(valid, ell.detach(), torch.zeros_like(ell.detach())))
    if not compute_grad:
        return ell_out, None, vocab

    weight = torch.where(valid, row_weight(vocab).to(dtype), torch.zeros((), dtype=dtype, device=device))
    with torch.enable_grad():  # (an autograd.Function's forward runs with grad mode off)
        weighted = (torch.where(valid, ell, torch.zeros_like(ell)) * weight).sum()
    partial = torch.autograd.grad(weighted, totals, allow_unused=True)
    adjoints: list = [None] * len(totals)
    for level in reversed(range(len(totals))):
        adjoint = torch.zeros_like(totals[level]) if partial[level] is None else partial[level].detach()
        for later in range(level + 1, len(totals)):
            adjoint = adjoint + torch.einsum("ni,nik->nk", adjoints[later], jacobians[later][level])
        adjoints[level] = adjoint
    grad = torch.empty((rows, shard.size), dtype=grad_dtype or student.dtype, device=device)
    for block in blocks:
        with torch.enable_grad():
            sub, _ = chunk(block, True)
            pairs = []
            for level in range(len(form.levels)):
                sums, _, _ = level_sums(sub, level, block, totals, constants)
                if sums.requires_grad:
                    pairs.append((sums, adjoints[level][block]))
            local = torch.autograd.grad([s for s, _ in pairs], sub.student, [a for _, a in pairs],
                                        allow_unused=True)[0] if pairs else None
        if local is None:
            local = torch.zeros_like(sub.student)
        keep = valid[block].unsqueeze(-1)
        local = torch.where(keep, local, torch.zeros((), dtype=dtype, device=device))
        grad[block] = torch.where(bad[block].unsqueeze(-1), nan, local)
    return ell_out, grad, vocab


# --- the forms -----------------------------------------------------------------------------------

def _divided(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return x if temperature == 1.0 else x / temperature


def _ce_sums(ctx: Context, logits_t1: torch.Tensor, shift: torch.Tensor) -> List[torch.Tensor]:
    """The CE term's local sums at T = 1: Σ e^{z − M₁} and the label's logit (owner only)."""
    label = owned_values(logits_t1, ctx.target.unsqueeze(-1), ctx.shard,
                         torch.ones_like(ctx.target, dtype=torch.bool).unsqueeze(-1)).squeeze(-1)
    return [sum_exp(logits_t1, shift), label]


def _ce_loss(shift: torch.Tensor, sum_t1: torch.Tensor, label_logit: torch.Tensor) -> torch.Tensor:
    return shift + safe_log(sum_t1) - label_logit


class DenseDivergence(RowForm):
    """Forward/reverse/mixed KL (one level), JSD, TVD and the skew KLs (two levels) between
    p = softmax(z'^s/T) and q = softmax(z'^t/T), z' the transformed logits, plus (1 − α)·CE."""

    def __init__(self, *, divergence="forward_kl", beta=0.5, skew_alpha=0.1, mixed_kl_weight=0.5, temperature=1.0,
                 t2_scaling=False, alpha=1.0, student_logit_scale=1.0, student_softcap=None,
                 teacher_logit_scale=1.0, teacher_softcap=None, **_unused):
        # the endpoints of the weighted forms are the plain KLs (one level, two collectives)
        self.form, _ = dense_canonical_divergence(divergence, beta=beta, skew_alpha=skew_alpha,
                                                  mixed_kl_weight=mixed_kl_weight)
        self.beta, self.skew_alpha, self.mixed_kl_weight = beta, skew_alpha, mixed_kl_weight
        self.temperature, self.alpha = temperature, alpha
        self.scale = alpha * (temperature**2 if t2_scaling else 1.0)
        self.transforms = ((student_logit_scale, student_softcap), (teacher_logit_scale, teacher_softcap))
        self.two_level = self.form not in ("forward_kl", "reverse_kl", "mixed_kl")
        self.levels = (self.level_one, self.level_two) if self.two_level else (self.level_one,)

    def student_logits(self, ctx):
        return transform_logits(ctx.student, *self.transforms[0])

    def teacher_logits(self, ctx):
        return transform_logits(ctx.teacher, *self.transforms[1])

    def prepare(self, ctx):
        z_s, z_t = self.student_logits(ctx), self.teacher_logits(ctx)
        ctx.local.update(z_s=z_s, a=_divided(z_s, self.temperature), b=_divided(z_t, self.temperature))

    def maxima(self, ctx):
        maxima = [row_max(ctx.local["a"]), row_max(ctx.local["b"])]
        if self.alpha < 1:
            maxima.append(row_max(ctx.local["z_s"]))
        return torch.stack(maxima, dim=-1)

    def level_one(self, ctx, totals, constants):
        a, b, m = ctx.local["a"], ctx.local["b"], ctx.local["max"]
        e_a, e_b = torch.exp(a - m[:, :1]), torch.exp(b - m[:, 1:2])
        sums = [e_a.sum(dim=-1)]
        if self.form in ("forward_kl", "mixed_kl"):
            sums.append(weighted_difference(e_b, b, a))          # W_t: Σ q̂ (b − a)
        if self.form in ("reverse_kl", "mixed_kl"):
            sums.append(weighted_difference(e_a, a, b))          # W_s: Σ p̂ (a − b)
        if self.alpha < 1:
            sums += _ce_sums(ctx, ctx.local["z_s"], m[:, 2])
        return torch.stack(sums, dim=-1), e_b.detach().sum(dim=-1, keepdim=True)

    def _normalisers(self, ctx, totals, constants):
        m = ctx.local["max"]
        log_s = m[:, 0] + safe_log(totals[0][:, 0])              # A = M_s + log S_s
        log_t = m[:, 1] + safe_log(constants[0][:, 0])           # B = M_t + log S_t
        return log_s, log_t

    def level_two(self, ctx, totals, constants):
        log_s, log_t = self._normalisers(ctx, totals, constants)
        log_p = ctx.local["a"] - log_s.unsqueeze(-1)
        log_q = ctx.local["b"] - log_t.detach().unsqueeze(-1)
        share = divergence_rows(log_p, log_q, self.form, beta=self.beta, skew_alpha=self.skew_alpha,
                                mixed_kl_weight=self.mixed_kl_weight)
        return share.unsqueeze(-1), share.new_zeros(share.shape + (0,))

    def loss(self, ctx, totals, constants):
        log_s, log_t = self._normalisers(ctx, totals, constants)
        level = totals[0]
        column = 1
        if self.two_level:
            divergence = totals[1][:, 0]
        else:
            forward = reverse = None
            if self.form in ("forward_kl", "mixed_kl"):
                forward = level[:, column] / constants[0][:, 0] - log_t + log_s
                column += 1
            if self.form in ("reverse_kl", "mixed_kl"):
                reverse = level[:, column] / level[:, 0] - log_s + log_t
                column += 1
            if self.form == "forward_kl":
                divergence = forward
            elif self.form == "reverse_kl":
                divergence = reverse
            else:
                w = self.mixed_kl_weight
                divergence = w * forward + (1 - w) * reverse
        ell = self.scale * divergence if self.alpha > 0 else torch.zeros_like(log_s)
        if self.alpha < 1:
            ce = _ce_loss(ctx.local["max"][:, 2], level[:, column], level[:, column + 1])
            ell = ell + (1 - self.alpha) * ce
        return ell


class Spherical(DenseDivergence):
    """SKD: the forward KL (and CE) on h = κ·normalize(z) of both networks, the row statistics of
    the normalisation reduced first (level 0: Σz, Σz² and the width, fp64 sums; the MAX of z travels
    concurrently): ``layernorm`` κ(z − μ)/√(var + ε) (biased var), ``l2`` κz/max(‖z‖, ε),
    ``standardize`` κ(z − μ)/(σ + ε) (unbiased σ)."""
    max_with_first_level = True

    def __init__(self, *, temperature=4.0, multiplier=2.0, alpha=1.0, eps=1e-7, normalize="layernorm", **_unused):
        super().__init__(divergence="forward_kl", temperature=temperature, t2_scaling=True, alpha=alpha)
        self.multiplier, self.eps, self.normalize = multiplier, eps, normalize
        self.levels = (self.level_zero, self.level_one_sphere)

    def prepare(self, ctx):
        pass

    def maxima(self, ctx):
        return torch.stack([row_max(ctx.student), row_max(ctx.teacher)], dim=-1)

    def after_max(self, ctx, maxima):
        ctx.local["z_max"] = maxima

    def level_zero(self, ctx, totals, constants):
        z_s, z_t = ctx.student.double(), ctx.teacher.double()
        sums = torch.stack([z_s.sum(dim=-1), (z_s * z_s).sum(dim=-1)], dim=-1)
        width = z_t.new_full(z_t.shape[:1], float(ctx.shard.size))
        consts = torch.stack([z_t.sum(dim=-1), (z_t * z_t).sum(dim=-1), width], dim=-1)
        return sums, consts

    def _centre_and_scale(self, total, square, vocab):
        """(centre, divisor) with h = κ·(z − centre)/divisor, from the row sums."""
        if self.normalize == "l2":
            return torch.zeros_like(total), torch.sqrt(square).clamp_min(self.eps)
        mean = total / vocab
        if self.normalize == "layernorm":
            return mean, torch.sqrt(square / vocab - mean * mean + self.eps)
        var = (square - vocab * mean * mean) / (vocab - 1).clamp_min(1)
        return mean, torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny)) + self.eps

    def _shifts(self, ctx, totals, constants, dtype):
        """The row maxima of h/T (student, teacher) and of h (CE): max h = κ(max z − centre)/divisor,
        the map being increasing; constants, so they carry no gradient."""
        with torch.no_grad():
            vocab = constants[0][:, 2]
            centre_s, div_s = self._centre_and_scale(totals[0][:, 0], totals[0][:, 1], vocab)
            centre_t, div_t = self._centre_and_scale(constants[0][:, 0], constants[0][:, 1], vocab)
            z_max = ctx.local["z_max"].to(torch.float64)
            shift_s = self.multiplier * (z_max[:, 0] - centre_s) / div_s
            shift_t = self.multiplier * (z_max[:, 1] - centre_t) / div_t
            t = self.temperature
            return finite_shift(torch.stack([shift_s / t, shift_t / t, shift_s], dim=-1).to(dtype))

    def level_one_sphere(self, ctx, totals, constants):
        dtype = ctx.student.dtype
        vocab = constants[0][:, 2]
        centre_s, div_s = self._centre_and_scale(totals[0][:, 0], totals[0][:, 1], vocab)
        with torch.no_grad():
            centre_t, div_t = self._centre_and_scale(constants[0][:, 0], constants[0][:, 1], vocab)
        kappa, temperature = self.multiplier, self.temperature
        h_s = kappa * (ctx.student - centre_s.to(dtype).unsqueeze(-1)) / div_s.to(dtype).unsqueeze(-1)
        h_t = kappa * (ctx.teacher - centre_t.to(dtype).unsqueeze(-1)) / div_t.to(dtype).unsqueeze(-1)
        ctx.local.update(z_s=h_s, a=h_s / temperature, b=h_t / temperature,
                         max=self._shifts(ctx, totals, constants, dtype))
        return self.level_one(ctx, totals, constants)

    def loss(self, ctx, totals, constants):
        # the forward-KL form of DenseDivergence reading level one (totals[1], constants[1])
        ctx.local["max"] = self._shifts(ctx, totals, constants, totals[1].dtype)
        return super().loss(ctx, totals[1:], constants[1:])


class TopK(RowForm):
    """A top-k teacher (global indices and log-probs replicated on every rank) against the student's
    vocabulary-parallel distribution, every ``tail`` mode, as :func:`kdfast.topk_divergence_loss`."""

    def __init__(self, indices, logprobs, *, divergence="forward_kl", beta=0.5, mixed_kl_weight=0.5,
                 tail="renormalize", temperature=1.0, teacher_temperature=None, t2_scaling=False, alpha=1.0,
                 reverse_kl_floor=None, student_logit_scale=1.0, student_softcap=None, **_unused):
        self.indices, self.logprobs = indices.long(), logprobs.detach()
        self.form = canonical_divergence(divergence, beta, mixed_kl_weight)
        self.beta, self.mixed_kl_weight, self.tail = beta, mixed_kl_weight, tail
        self.temperature, self.alpha = temperature, alpha
        self.ratio = (temperature if teacher_temperature is None else teacher_temperature) / temperature
        self.scale = alpha * (temperature**2 if t2_scaling else 1.0)
        self.floor = reverse_kl_floor if tail == "renormalize" and self.form in ("reverse_kl", "mixed_kl") else None
        self.transform = (student_logit_scale, student_softcap)
        self.needs_max = not (tail == "renormalize_both" and alpha == 1)
        self.levels = (self.level_one,)

    def setup(self, ctx):
        real = (self.logprobs > NEG_INF) & ctx.valid.unsqueeze(-1)
        check_distinct(self.indices, real)
        ctx.local.update(real=real, indices=torch.where(real, self.indices, torch.zeros_like(self.indices)))
        if not self.needs_max:  # no exp over the vocabulary: no shift
            ctx.local["max"] = torch.zeros(real.shape[0], 2, dtype=compute_dtype(self.logprobs.dtype),
                                           device=real.device)

    def prepare(self, ctx):
        z = transform_logits(ctx.student, *self.transform)
        ctx.local.update(z=z, a=_divided(z, self.temperature))

    def maxima(self, ctx):
        if not self.needs_max:
            return None
        return torch.stack([row_max(ctx.local["a"]), row_max(ctx.local["z"])], dim=-1)

    def level_one(self, ctx, totals, constants):
        a, m, real, indices = ctx.local["a"], ctx.local["max"], ctx.local["real"], ctx.local["indices"]
        sums = [owned_values(a, indices, ctx.shard, real)]                  # a_K (k columns)
        if self.tail != "renormalize_both":
            e_a = torch.exp(a - m[:, :1])
            local = indices - ctx.shard.start
            owned = real & (local >= 0) & (local < ctx.shard.size)
            in_k = self._in_k(a, local, owned)
            tail = torch.where(in_k, torch.zeros((), dtype=a.dtype, device=a.device), e_a)
            sums.append(e_a.sum(dim=-1, keepdim=True))                       # S_s
            sums.append(tail.sum(dim=-1, keepdim=True))                      # S_R, accumulated directly
            if self.floor is not None:
                entropy = weighted_difference(tail, a, torch.zeros_like(a))  # Σ_R p̂ a
                sums.append(entropy.unsqueeze(-1))
        if self.alpha < 1:
            sums.append(torch.stack(_ce_sums(ctx, ctx.local["z"], m[:, 1]), dim=-1))
        return torch.cat(sums, dim=-1), a.new_zeros(a.shape[0], 0)

    @staticmethod
    def _in_k(a, local, owned):
        """Bool [n, V_r]: the local columns that belong to the row's top-k set."""
        marks = torch.zeros(a.shape, dtype=a.dtype, device=a.device)
        if a.shape[-1]:
            marks.scatter_add_(1, torch.where(owned, local, torch.zeros_like(local)), owned.to(a.dtype))
        return marks > 0

    def loss(self, ctx, totals, constants):
        real = ctx.local["real"]
        k = real.shape[-1]
        level = totals[0]
        a_k = level[:, :k]
        ell = self.logprobs.to(a_k.dtype).masked_fill(~real, NEG_INF)
        if self.tail in ("renormalize", "renormalize_both"):
            log_q_k = torch.log_softmax(self.ratio * ell, dim=-1)
        else:
            log_q_k = ell
        undefined = self.logprobs.isnan().any(dim=-1)         # a NaN teacher value poisons its row
        if self.tail in ("renormalize", "renormalize_both"):
            undefined = undefined | ~real.any(dim=-1)
        column = k
        if self.tail == "renormalize_both":
            student_k = a_k.masked_fill(~real, NEG_INF)
            undefined = undefined | ~(real & (a_k > NEG_INF)).any(dim=-1)
            safe = torch.where(undefined.unsqueeze(-1), torch.zeros_like(student_k), student_k)
            log_p_tilde = torch.log_softmax(safe, dim=-1).masked_fill(~real, NEG_INF)
            divergence = divergence_rows(log_p_tilde, log_q_k, self.form, beta=self.beta,
                                         mixed_kl_weight=self.mixed_kl_weight)
        else:
            m = ctx.local["max"][:, 0]
            total, tail_sum = level[:, column], level[:, column + 1]
            column += 2
            undefined = undefined | ~(total > 0)
            log_total = m + safe_log(total)
            log_p_k = torch.where(real, a_k - log_total.unsqueeze(-1), torch.full_like(a_k, NEG_INF))
            log_p_tail = safe_log(tail_sum) - safe_log(total)
            if self.floor is not None:
                entropy_sum = level[:, column]
                column += 1
                tail_mass = tail_sum / total
                # Σ_R p_j log p_j = (Σ_R p̂_j a_j)/S − log Z·P_R; λ replaces log q̃ outside K
                tail_terms = entropy_sum / total - log_total * tail_mass - self.floor * tail_mass
                reverse = kl_terms(log_p_k.exp(), log_p_k, log_q_k) + tail_terms
                if self.form == "reverse_kl":
                    divergence = reverse
                else:
                    forward = kl_terms(log_q_k.exp(), log_q_k, log_p_k)
                    w = self.mixed_kl_weight
                    divergence = w * forward + (1 - w) * reverse
            elif self.tail == "truncate":
                divergence = kl_terms(ell.exp(), ell, log_p_k)
            else:
                if self.tail == "bucket":
                    log_q_tail = log1mexp(torch.logsumexp(ell, dim=-1))
                    drop = (log_p_tail == NEG_INF) & (log_q_tail <= math.log(BUCKET_DROP_MASS))
                    log_q_tail = log_q_tail.masked_fill(drop, NEG_INF)
                else:
                    log_q_tail = torch.full_like(log_p_tail, NEG_INF)
                log_p_bins = torch.cat([log_p_k, log_p_tail.unsqueeze(-1)], dim=-1)
                log_q_bins = torch.cat([log_q_k, log_q_tail.unsqueeze(-1)], dim=-1)
                divergence = divergence_rows(log_p_bins, log_q_bins, self.form, beta=self.beta,
                                             mixed_kl_weight=self.mixed_kl_weight)
        undefined = undefined & ctx.valid
        ctx.local["undefined"] = undefined
        safe = torch.where(undefined, torch.zeros_like(divergence), divergence)
        loss = self.scale * safe if self.alpha > 0 else torch.zeros_like(safe)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * _ce_loss(ctx.local["max"][:, 1], level[:, column], level[:, column + 1])
        return loss


# --- autograd ----------------------------------------------------------------------------------

class _ParallelRowLoss(torch.autograd.Function):
    """The loss in the forward with its local gradient; backward scales the saved gradient."""

    @staticmethod
    def forward(ctx, student, run):
        loss, grad = run(student, True)
        ctx.save_for_backward(grad)
        ctx.input_dtype = student.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, = ctx.saved_tensors
        upstream = grad_output.to(compute_dtype(ctx.input_dtype))
        if upstream.dim():
            upstream = upstream.unsqueeze(-1)
        return (grad * upstream).to(ctx.input_dtype), None


# --- entry points of the public losses -----------------------------------------------------------

def _shard_of_dtensor(logits, name: str):
    """(local tensor, group, start) of a DTensor sharded on its last dimension over a 1-D mesh (or
    one mesh dimension; the others must replicate)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    last = logits.dim() - 1
    shard_dims = [i for i, p in enumerate(logits.placements) if isinstance(p, Shard)]
    if len(shard_dims) != 1 or logits.placements[shard_dims[0]].dim not in (last, -1) or not all(
            isinstance(p, (Shard, Replicate)) for p in logits.placements):
        raise ValueError(f"{name} as a DTensor must be sharded on its last (vocabulary) dimension over one mesh "
                         f"dimension and replicated over the others; got placements {tuple(logits.placements)}")
    mesh_dim = shard_dims[0]
    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, logits.placements)
    return logits.to_local(), logits.device_mesh.get_group(mesh_dim), int(offset[-1])


def is_dtensor(value) -> bool:
    """Whether ``value`` is a DTensor, without importing torch.distributed.tensor (0.8 s): a DTensor
    can only exist once that module is loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def local_logits(student_logits, teacher_logits, group, vocab_start_index):
    """(student, teacher, group, start) as local tensors: DTensors sharded on the vocabulary are
    unwrapped (their mesh gives the group and the offset; ``vocab_start_index`` must then be None)."""
    if is_dtensor(student_logits):
        if vocab_start_index is not None:
            raise ValueError("vocab_start_index must be None when student_logits is a DTensor (its placement "
                             "gives the offset)")
        student_logits, mesh_group, vocab_start_index = _shard_of_dtensor(student_logits, "student_logits")
        if group is not None and group is not mesh_group:
            raise ValueError("vocab_parallel_group differs from the process group of student_logits' device mesh")
        group = mesh_group
        if teacher_logits is not None and is_dtensor(teacher_logits):
            teacher_logits, teacher_group, teacher_start = _shard_of_dtensor(teacher_logits, "teacher_logits")
            if teacher_start != vocab_start_index or teacher_group is not group:
                raise ValueError("teacher_logits must be sharded like student_logits")
        elif teacher_logits is not None:
            raise ValueError("student_logits is a DTensor but teacher_logits is not; pass both as DTensors sharded on "
                             "the vocabulary, or both as local shards with vocab_parallel_group")
    elif teacher_logits is not None and is_dtensor(teacher_logits):
        raise ValueError("teacher_logits is a DTensor but student_logits is not; pass both as DTensors sharded on "
                         "the vocabulary, or both as local shards with vocab_parallel_group")
    return student_logits, teacher_logits, group, vocab_start_index


def _check_in_vocabulary(name: str, values: torch.Tensor, present: torch.Tensor, vocab: torch.Tensor) -> None:
    """Global class indices must lie below the global vocabulary size (known after the first
    collective; checked on CPU, where reading it costs no device synchronisation)."""
    if values.device.type == "cpu" and values.numel() and bool((values.ge(vocab) & present).any()):
        raise ValueError(f"{name} holds a class index ≥ the vocabulary size {int(vocab)} of the sharded logits")


def form_for(loss_name: str, options: dict, indices=None, logprobs=None) -> RowForm:
    """The form of a public loss: ``kd_loss`` (forward KL with T²), ``skd_loss``,
    ``divergence_loss``, ``topk_divergence_loss`` (with the rows' top-k indices and log-probs)."""
    if loss_name == "kd_loss":
        return DenseDivergence(divergence="forward_kl", t2_scaling=True, **options)
    if loss_name == "skd_loss":
        return Spherical(**options)
    if loss_name == "divergence_loss":
        return DenseDivergence(**options)
    if loss_name == "topk_divergence_loss":
        return TopK(indices, logprobs, **options)
    raise ValueError(f"{loss_name} has no vocabulary-parallel form")


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V_r] → [N, V_r], also for a rank without columns (V_r = 0)."""
    return logits.reshape(math.prod(logits.shape[:-1]), logits.shape[-1])


def vocab_parallel_loss(loss_name: str, student_logits: torch.Tensor, teacher, target: Optional[torch.Tensor], *,
                        group, vocab_start_index: Optional[int], reduction: str, num_items_in_batch=None,
                        ignore_index: Optional[int] = -100, **options) -> torch.Tensor:
    """The vocabulary-parallel form of ``kd_loss`` / ``skd_loss`` / ``divergence_loss`` (``teacher``
    the teacher's local logits) and ``topk_divergence_loss`` (``teacher`` = (indices, log-probs),
    replicated) on checked [..., V_r] local logits; "none" keeps the leading shape."""
    if loss_name == "topk_divergence_loss":
        indices, logprobs = teacher
        k = indices.shape[-1]
        form = form_for(loss_name, options, indices.reshape(-1, k), logprobs.reshape(-1, k))
        teacher_rows = None
    else:
        form = form_for(loss_name, options)
        teacher_rows = _as_rows(teacher)
    leading = student_logits.shape[:-1]
    rows = _as_rows(student_logits)
    flat_target = None if target is None else target.reshape(-1)
    shard = vocab_shard(group, vocab_start_index, rows.shape[-1])
    dtype = compute_dtype(rows.dtype)
    valid, _ = valid_rows(flat_target, ignore_index, rows.shape[0], rows.device)

    def weight(vocab: torch.Tensor) -> torch.Tensor:  # the global vocabulary size is known after level one
        return row_weights(valid, reduction, vocab, num_items_in_batch, dtype)

    def run(values: torch.Tensor, compute_grad: bool):
        loss_rows, grad, vocab = parallel_rows(form, values, teacher_rows, flat_target, ignore_index, shard, weight,
                                               compute_grad=compute_grad, grad_dtype=dtype)
        if flat_target is not None:
            _check_in_vocabulary("target", flat_target, valid, vocab)
        if isinstance(form, TopK):
            _check_in_vocabulary("teacher_topk_indices", form.indices, form.logprobs > NEG_INF, vocab)
        return reduce_loss_rows(loss_rows, valid, reduction, vocab, num_items_in_batch), grad

    if rows.requires_grad and torch.is_grad_enabled():
        loss = _ParallelRowLoss.apply(rows, run)
    else:
        loss = run(rows.detach(), False)[0]
    return loss.reshape(leading) if reduction == "none" else loss
