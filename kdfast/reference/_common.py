"""Small pieces every reference loss shares: row masks, reductions, the soft KL term, and the
rules for special values that every backend follows.

Special values (the same for every family and every backend; the reference implements them
and the fused kernels are tested against it):

- **−inf logits are masked entries**: an entry of −inf has probability 0 and 0·log 0 counts as 0,
  in the teacher, in the student, or in both. A student −inf where the teacher puts mass makes
  that row's loss +inf (KL to a distribution the student excludes); everything else stays finite,
  gradients included. ``torch.finfo(dtype).min`` is an ordinary, very negative logit.
- **NaN poisons exactly its row**: a NaN anywhere in a row's inputs (the student row, or the
  teacher row of that row) makes that row's loss NaN and its *whole* gradient row NaN
  (:func:`nan_rows_propagate`); the other rows keep their values and gradients. A reduction over
  a NaN row is NaN. (A NaN in a table every row reads — class centres, landmarks, or any teacher
  row under Nyström's whole-batch normalisation — reaches every row that reads it.)
- **Ignored rows are absent**: a row whose label is ``ignore_index`` has loss 0 and gradient 0
  whatever it holds (NaN and ±inf included): its inputs are replaced by zeros before any math
  (:func:`mask_rows`), and ``torch.where``'s backward writes exactly 0 there.
- **Labels** may be of any integer dtype (int32, int64, …) and any stride.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in fp32 for half inputs and in fp64 for fp64 inputs (the gradcheck path)."""
    return torch.promote_types(dtype, torch.float32)


def valid_rows(target: Optional[torch.Tensor], ignore_index: Optional[int], num_rows: int,
               device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(mask of rows that count, target with ignored rows replaced by class 0 so gathers are safe).
    ``target`` may have any integer dtype and any stride."""
    if target is None:
        return torch.ones(num_rows, dtype=torch.bool, device=device), None
    target = target.long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def mask_rows(rows: Optional[torch.Tensor], valid: torch.Tensor) -> Optional[torch.Tensor]:
    """``rows`` [N, ...] with the rows not in ``valid`` replaced by zeros: an ignored row then
    computes from harmless values (no NaN or inf can leak into its gradient), and the backward of
    ``torch.where`` gives it exactly 0."""
    if rows is None:
        return None
    keep = valid.reshape(valid.shape + (1,) * (rows.dim() - 1))
    return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def rows_with_nan(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool [N]: the rows holding a NaN in any of the given [N, ...] tensors (None skipped)."""
    present = [t for t in tensors if t is not None]
    has_nan = torch.zeros(present[0].shape[0], dtype=torch.bool, device=present[0].device)
    for tensor in present:
        nan = tensor.detach().isnan()
        has_nan = has_nan | (nan.flatten(1).any(dim=-1) if nan.dim() > 1 else nan)
    return has_nan


class _NanRowsPropagate(torch.autograd.Function):
    """Identity forward; backward makes the gradient rows NaN where ``has_nan`` is set."""

    @staticmethod
    def forward(ctx, x, has_nan):
        ctx.save_for_backward(has_nan)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (has_nan,) = ctx.saved_tensors
        keep = ~has_nan.reshape(has_nan.shape + (1,) * (grad.dim() - 1))
        return torch.where(keep, grad, torch.full((), float("nan"), dtype=grad.dtype, device=grad.device)), None


def nan_rows_propagate(x: torch.Tensor, *row_inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` unchanged; in backward, the gradient rows of ``x`` whose row of ``x`` or of any of
    ``row_inputs`` holds a NaN are set to NaN as a whole. Autograd alone leaves a NaN row's
    gradient partly (or wholly) finite wherever a NaN reaches the gradient only through a
    comparison, a clamp or a product with zero; this makes the rule "NaN → whole row NaN" exact."""
    return _NanRowsPropagate.apply(x, rows_with_nan(x, *row_inputs))


def nan_where(per_row: torch.Tensor, has_nan: torch.Tensor) -> torch.Tensor:
    """Per-row losses with NaN forced on the rows marked in ``has_nan``."""
    return torch.where(has_nan, torch.full((), float("nan"), dtype=per_row.dtype, device=per_row.device), per_row)


def reduce_rows(per_row: torch.Tensor, valid: torch.Tensor, reduction: str,
                mean_divisor: int = 1, num_items_in_batch=None) -> torch.Tensor:
    """Apply a reduction to per-row losses; ignored rows count neither in the sum nor the divisor.

    ``batchmean`` divides by the number of counted rows; ``mean`` additionally divides by
    ``mean_divisor`` (the number of classes for KL-type losses, as torch.nn.KLDivLoss does, and 1
    for CE-type losses, as torch.nn.CrossEntropyLoss does). With no counted row (an empty batch or
    every row ignored) the divisor is clamped to 1, so the loss is 0 with a zero gradient.
    ``num_items_in_batch`` (a number or a 0-dim tensor), when given, replaces the ``batchmean``
    divisor: Hugging Face's gradient-accumulation count of the items in the whole accumulated batch.
    """
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None and reduction == "batchmean":
        if isinstance(num_items_in_batch, torch.Tensor):
            return total / num_items_in_batch.to(device=total.device, dtype=total.dtype)
        return total / num_items_in_batch
    rows = valid.sum().clamp_min(1).to(per_row.dtype)
    if reduction == "batchmean":
        return total / rows
    if reduction == "mean":
        return total / (rows * mean_divisor)
    raise ValueError(f"reduction must be 'none', 'sum', 'mean' or 'batchmean'; got {reduction!r}")


def soft_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(q || p) = sum_c q_c (log q_c - log p_c), with 0 * log 0 taken as 0 (only an exact
    0, e.g. a −inf teacher logit: a NaN teacher row gives a NaN, not a silently dropped term).
    A class with q_c > 0 and log p_c = −inf (a masked student logit) gives +inf."""
    q = log_q.exp()
    terms = torch.where(q == 0, torch.zeros_like(q), q * (log_q - log_p))
    return terms.sum(dim=-1)


def cross_entropy_rows(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Row-wise -log p[y]."""
    return -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)


class Rows(NamedTuple):
    """A batch of rows ready for a reference loss (see :func:`prepare_rows`)."""
    student: torch.Tensor            #: compute dtype, ignored rows zeroed, NaN rows propagate in backward
    teacher: Optional[torch.Tensor]  #: compute dtype, detached, ignored rows zeroed
    valid: torch.Tensor              #: bool [N], the counted rows
    target: Optional[torch.Tensor]   #: int64 [N], ignored rows as class 0
    has_nan: torch.Tensor            #: bool [N], counted rows with a NaN in the student or teacher row


def prepare_rows(student: torch.Tensor, teacher: Optional[torch.Tensor], target: Optional[torch.Tensor],
                 ignore_index: Optional[int]) -> Rows:
    """The special-value rules of this module applied once: cast to the compute dtype, ignored rows
    zeroed (:func:`mask_rows`), NaN rows made whole-row NaN in the gradient (:func:`nan_rows_propagate`)."""
    dtype = compute_dtype(student.dtype)
    valid, safe_target = valid_rows(target, ignore_index, student.shape[0], student.device)
    student = mask_rows(student.to(dtype), valid)
    teacher = None if teacher is None else mask_rows(teacher.detach().to(dtype), valid)
    has_nan = rows_with_nan(student, teacher)
    return Rows(_NanRowsPropagate.apply(student, has_nan), teacher, valid, safe_target, has_nan)
