"""Reference of the feature–centre family: the ND loss (spec §2a–2c).

Special values follow :mod:`kdfast.reference._common`: a NaN in a row's student or teacher
features makes that row's loss and whole gradient row NaN (the other rows unchanged); an ignored
row has loss 0 and gradient 0 whatever it holds; labels may have any integer dtype and stride.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import compute_dtype, nan_where, prepare_rows, reduce_rows


def unit_centers(centers: torch.Tensor, eps: float) -> torch.Tensor:
    """ê_k = c_k / max(‖c_k‖, eps)."""
    return centers / centers.norm(dim=-1, keepdim=True).clamp_min(eps)


def nd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, target: torch.Tensor,
            centers: torch.Tensor, *, reduction: str = "mean", ignore_index: Optional[int] = -100,
            eps: float = 1e-8) -> torch.Tensor:
    """ND loss per row: 1 − ⟨u, ê_y⟩ / max(‖u‖, ‖f^t‖, eps).

    ``u`` are the student features already in the teacher's dimension (projected if needed),
    ``teacher_features`` count only through their row norms, ``centers`` is the raw C×d class-mean
    table of the teacher and is normalised here. On a tie ‖u‖ = ‖f^t‖ the cosine branch is taken,
    as Python's ``max`` in the official code does. ``mean`` averages over the counted rows.
    """
    rows = prepare_rows(student_features, teacher_features, target, ignore_index)
    u = rows.student
    centre = unit_centers(centers.detach().to(compute_dtype(student_features.dtype)), eps)[rows.target]
    u_norm = u.norm(dim=-1)
    teacher_norm = rows.teacher.norm(dim=-1)
    scale = torch.where(u_norm >= teacher_norm, u_norm, teacher_norm).clamp_min(eps)
    per_row = 1 - (u * centre).sum(dim=-1) / scale
    return reduce_rows(nan_where(per_row, rows.has_nan), rows.valid, reduction)
