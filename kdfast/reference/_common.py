"""Small pieces every reference loss shares: row masks, reductions, the soft KL term."""
from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in fp32 for half inputs and in fp64 for fp64 inputs (the gradcheck path)."""
    return torch.promote_types(dtype, torch.float32)


def valid_rows(target: Optional[torch.Tensor], ignore_index: Optional[int], num_rows: int,
               device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(mask of rows that count, target with ignored rows replaced by class 0 so gathers are safe)."""
    if target is None:
        return torch.ones(num_rows, dtype=torch.bool, device=device), None
    target = target.long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def reduce_rows(per_row: torch.Tensor, valid: torch.Tensor, reduction: str,
                mean_divisor: int = 1) -> torch.Tensor:
    """Apply a reduction to per-row losses; ignored rows count neither in the sum nor the divisor.

    ``batchmean`` divides by the number of counted rows; ``mean`` additionally divides by
    ``mean_divisor`` (the number of classes for KL-type losses, as torch.nn.KLDivLoss does, and 1
    for CE-type losses, as torch.nn.CrossEntropyLoss does). With no counted row (an empty batch or
    every row ignored) the divisor is clamped to 1, so the loss is 0 with a zero gradient.
    """
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    rows = valid.sum().clamp_min(1).to(per_row.dtype)
    if reduction == "batchmean":
        return total / rows
    if reduction == "mean":
        return total / (rows * mean_divisor)
    raise ValueError(f"reduction must be 'none', 'sum', 'mean' or 'batchmean'; got {reduction!r}")


def soft_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(q || p) = sum_c q_c (log q_c - log p_c), with 0 * log 0 taken as 0 (only an exact
    0: a NaN teacher row gives a NaN, not a silently dropped term)."""
    q = log_q.exp()
    terms = torch.where(q == 0, torch.zeros_like(q), q * (log_q - log_p))
    return terms.sum(dim=-1)


def cross_entropy_rows(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Row-wise -log p[y]."""
    return -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
