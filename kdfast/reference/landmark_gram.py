"""Reference of the landmark-Gram family: KDA / Nyström kernel transfer (spec §3a–3c).

Special values follow :mod:`kdfast.reference._common`: a NaN in a row's student or teacher
features makes that row's loss and whole gradient row NaN. With ``normalize`` the scale
1/‖S^t‖_F reads every teacher row, so there a NaN teacher row makes every row NaN; a NaN
landmark reaches every row too. ``fro`` is one norm of the whole residual: any NaN makes it NaN.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype, nan_rows_propagate, nan_where, rows_with_nan


def nystrom_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                 student_landmarks: torch.Tensor, teacher_landmarks: torch.Tensor, *,
                 kind: str = "smooth_l1", normalize: bool = True, reduction: str = "sum",
                 beta: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """Partial-Gram transfer: S^s = F^s·C^sᵀ, S^t = F^t·C^tᵀ (B×m), R = S^s − S^t.

    - ``smooth_l1``: Σ huber_β(R), huber_β(r) = r²/(2β) if |r| < β else |r| − β/2 (released KDA code).
    - ``sq_fro``: Σ R² = ‖R‖²_F.
    - ``fro``: ‖R‖_F (a norm of the whole matrix, so only reduction ``sum``).
    ``normalize`` divides by ‖S^t‖_F + eps. ``none`` gives the per-row sums (B,), ``mean`` divides
    the sum by B·m. Landmarks and teacher features are constants (detached).
    """
    dtype = compute_dtype(student_features.dtype)
    student = student_features.to(dtype)
    teacher = teacher_features.detach().to(dtype)
    has_nan = rows_with_nan(student, teacher)
    student_gram = nan_rows_propagate(student, teacher) @ student_landmarks.detach().to(dtype).T
    teacher_gram = teacher @ teacher_landmarks.detach().to(dtype).T
    residual = student_gram - teacher_gram
    scale = 1 / (teacher_gram.norm() + eps) if normalize else 1.0

    if kind == "fro":
        if reduction != "sum":
            raise ValueError(f"reduction must be 'sum' for kind='fro' (a matrix norm); got {reduction!r}")
        # sqrt has an infinite slope at 0: R = 0 takes sqrt(tiny) so its gradient is zero, not NaN
        # (a where, not a clamp: a clamp would also give a NaN sum a zero gradient).
        total = residual.pow(2).sum()
        return torch.where(total == 0, torch.finfo(dtype).tiny, total).sqrt() * scale
    if kind == "smooth_l1":
        size = residual.abs()
        elementwise = torch.where(size < beta, 0.5 * residual.pow(2) / beta, size - 0.5 * beta)
    elif kind == "sq_fro":
        elementwise = residual.pow(2)
    else:
        raise ValueError(f"kind must be 'smooth_l1', 'fro' or 'sq_fro'; got {kind!r}")

    per_row = nan_where(elementwise.sum(dim=-1), has_nan) * scale
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(residual.numel(), 1)
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean'; got {reduction!r}")


def nystrom_reconstruction(features: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """The Nyström approximation of the linear-kernel Gram matrix: K ≈ C·W⁺·Cᵀ with C = F·Dᵀ and
    W = D·Dᵀ (spec §3a). A utility for checks (V4.1), not a training loss."""
    cross = features @ landmarks.T
    return cross @ torch.linalg.pinv(landmarks @ landmarks.T) @ cross.T
