"""What every fused backend (cpu, triton, cuda) shares: the autograd around a kernel that returns
its gradient together with the loss, and the seven public losses built on a backend's three
kernels (:func:`build_losses`). The kernels' formulas, code tables and the translation of public
options into kernel parameters are in :mod:`kdfast.backends._contract` (re-exported here:
``RowSoftmaxParams``, ``row_softmax_params``).

A backend supplies three kernels:

``row_softmax(student [N,C], teacher [N,C] | None, target [N] int64 | None, p: RowSoftmaxParams)``
    → ``(loss_rows [N] fp32 (fp64 for fp64 input), grad [N,C] in student's dtype)``.

``feature_centre(u [B,d], teacher_features [B,d], target [B] int64, centers [C,d] raw, eps,
ignore_index)`` → ``(loss_rows [B], grad [B,d])``: ND's 1 − ⟨u, ê_y⟩/max(‖u‖, ‖f^t‖, eps); rows whose
label equals ``ignore_index`` (``_contract.NO_IGNORE_INDEX``: none) get loss 0 and a zero gradient.

``landmark_gram(Fs [B,ds], Ft [B,dt], Cs [m,ds], Ct [m,dt], kind, beta, weight, normalize, eps)``
with kind in ``"smooth_l1"``, ``"sq_fro"`` → ``(loss_rows [B], grad [B,ds], teacher_gram_norm [])``:
the per-row sums of huber_β(R) or R², R = Fs·Csᵀ − Ft·Ctᵀ, and their gradient, both multiplied by
``weight`` and, with ``normalize``, divided by ‖S^t‖_F + eps — applied to G = ∂ℓ/∂R before the
G·Cs GEMM, so that no pass over the [B, ds] gradient is needed. "fro" (a square root of the sum) is
done here from unweighted sums.

Every kernel writes a zero gradient row (and loss 0) for an ignored row and a whole NaN gradient
row (and a NaN loss) for a row holding a NaN. Reductions, the ignore mask and the dtype of the
result follow the reference exactly (the same helper is used), so a backend only has to get the
per-row numbers right.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from ..reference._common import compute_dtype, reduce_rows, valid_rows
from ._contract import RowSoftmaxParams, kernel_ignore_index, row_softmax_params

__all__ = ["RowSoftmaxParams", "row_softmax_params", "KernelLoss", "build_losses"]


#: gradients at least this large are worth a device sync to skip a rescaling pass over them
SYNC_WORTH_ELEMENTS = 1 << 20


def _can_inspect(tensor: torch.Tensor, work: int = 0) -> bool:
    """Whether to read a value of ``tensor`` on the host: free for a CPU tensor; on an accelerator a
    sync, worth it only when it saves a pass over ``work`` elements. Never while tracing."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or work >= SYNC_WORTH_ELEMENTS


class KernelLoss(torch.autograd.Function):
    """Autograd around a kernel returning (loss_rows, grad, *extras): backward rescales the saved
    gradient by the incoming per-row gradient (the reduction's chain rule).

    ``live_rows`` marks the rows whose saved gradient may be non-zero (the kernel writes zeros for
    the others). When the per-row gradient is exactly 1 on every live row — ``loss.backward()`` on a
    reduction whose scale was folded into the kernel (see :func:`build_losses`) — the saved
    gradient is returned as it is: no pass and no second [N, C] tensor. It is never modified in
    place, so ``retain_graph``, ``torch.autograd.grad`` and gradcheck see correct values.
    """

    @staticmethod
    def forward(ctx, student, live_rows, kernel, *arguments):
        loss_rows, grad, *extras = kernel(student, *arguments)
        ctx.save_for_backward(grad, live_rows)
        ctx.num_arguments = len(arguments)
        ctx.mark_non_differentiable(*extras)
        return (loss_rows, *extras)

    @staticmethod
    def backward(ctx, grad_rows, *unused):
        grad, live_rows = ctx.saved_tensors
        nothing = (None, None) + (None,) * ctx.num_arguments
        if not torch.is_grad_enabled() and _can_inspect(grad_rows, grad.numel()) \
                and bool(((grad_rows == 1) | ~live_rows).all()):
            return (grad,) + nothing
        return (grad * grad_rows.unsqueeze(-1).to(grad.dtype),) + nothing


def _folded_scale(reduction: str, valid: torch.Tensor, target: Optional[torch.Tensor], num_classes: int,
                  mean_kind: str) -> float:
    """The factor the reduction will multiply every counted row's gradient by, when it is known
    on the host without a device sync (no target, or a CPU target outside tracing); else 1."""
    if reduction in ("none", "sum"):
        return 1.0
    if target is None:
        counted = valid.shape[0]
    elif _can_inspect(valid):
        counted = int(valid.sum())
    else:
        return 1.0
    divisor = num_classes if (reduction == "mean" and mean_kind == "kl") else 1
    return 1.0 / (max(counted, 1) * divisor)


def build_losses(row_softmax: Callable, feature_centre: Callable, landmark_gram: Callable) -> dict:
    """The public losses (reference signatures) on top of a backend's three kernels."""

    def row_loss(name, student_logits, teacher_logits, target, options):
        params, reduction, mean_kind = row_softmax_params(name, **options)
        teacher = None if teacher_logits is None else teacher_logits.detach()
        target = None if target is None else target.long()
        valid, _ = valid_rows(target, options.get("ignore_index"), student_logits.shape[0], student_logits.device)
        num_classes = student_logits.shape[-1]
        # The gradient is linear in the three weights: scaling them by the reduction's factor makes
        # the kernel write the final gradient, so a plain loss.backward() needs no pass over it.
        scale = _folded_scale(reduction, valid, target, num_classes, mean_kind)
        params = replace(params, kl_weight=params.kl_weight * scale, ce_weight=params.ce_weight * scale,
                         uniform_weight=params.uniform_weight * scale)
        loss_rows, = KernelLoss.apply(student_logits, valid, row_softmax, teacher, target, params)
        loss_rows = loss_rows.to(compute_dtype(student_logits.dtype)) / scale
        return reduce_rows(loss_rows, valid, reduction, num_classes if mean_kind == "kl" else 1)

    def kd_loss(student_logits, teacher_logits, target=None, **options):
        return row_loss("kd_loss", student_logits, teacher_logits, target, options)

    def skd_loss(student_logits, teacher_logits, target=None, **options):
        return row_loss("skd_loss", student_logits, teacher_logits, target, options)

    def partial_teacher_loss(student_logits, teacher_logits, target, **options):
        return row_loss("partial_teacher_loss", student_logits, teacher_logits, target, options)

    def label_smoothing_loss(student_logits, target, **options):
        return row_loss("label_smoothing_loss", student_logits, None, target, options)

    def reweighted_ce_loss(student_logits, teacher_logits, target, **options):
        return row_loss("reweighted_ce_loss", student_logits, teacher_logits, target, options)

    def nd_loss(student_features, teacher_features, target, centers, *, reduction="mean", ignore_index=-100,
                eps=1e-8):
        target = target.long()
        valid, _ = valid_rows(target, ignore_index, student_features.shape[0], student_features.device)
        # the kernel writes loss 0 and a zero gradient row for the ignored rows itself
        loss_rows, = KernelLoss.apply(student_features, valid, feature_centre, teacher_features.detach(),
                                      target, centers.detach(), eps, kernel_ignore_index(ignore_index))
        return reduce_rows(loss_rows.to(compute_dtype(student_features.dtype)), valid, reduction)

    def nystrom_loss(student_features, teacher_features, student_landmarks, teacher_landmarks, *,
                     kind="smooth_l1", normalize=True, reduction="sum", beta=1.0, eps=1e-12):
        dtype = compute_dtype(student_features.dtype)
        every_row = torch.ones(student_features.shape[0], dtype=torch.bool, device=student_features.device)
        arguments = (teacher_features.detach(), student_landmarks.detach(), teacher_landmarks.detach())
        if kind == "fro":  # sqrt of the whole sum: the kernel's sums unweighted, the chain rule here
            loss_rows, teacher_norm = KernelLoss.apply(student_features, every_row, landmark_gram, *arguments,
                                                       "sq_fro", beta, 1.0, False, eps)
            scale = 1 / (teacher_norm.to(dtype) + eps) if normalize else 1.0
            # R = 0 takes sqrt(tiny) (a zero gradient, not NaN); a where, not a clamp, so that a NaN
            # sum keeps a NaN gradient
            total = loss_rows.to(dtype).sum()
            return torch.where(total == 0, torch.finfo(dtype).tiny, total).sqrt() * scale
        # the kernel applies the mean's divisor and the normalisation, so loss.backward() needs no pass
        weight = 1 / max(student_features.shape[0] * student_landmarks.shape[0], 1) if reduction == "mean" else 1.0
        loss_rows, _ = KernelLoss.apply(student_features, every_row, landmark_gram, *arguments, kind, beta,
                                        weight, normalize, eps)
        loss_rows = loss_rows.to(dtype)
        return loss_rows if reduction == "none" else loss_rows.sum()

    return dict(kd_loss=kd_loss, skd_loss=skd_loss, partial_teacher_loss=partial_teacher_loss,
                label_smoothing_loss=label_smoothing_loss, reweighted_ce_loss=reweighted_ce_loss,
                nd_loss=nd_loss, nystrom_loss=nystrom_loss)
