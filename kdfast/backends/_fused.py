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

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from ..reference._common import compute_dtype, reduce_rows, valid_rows
from ..reference.divergence import transform_logits
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


def _graph_is_kept() -> bool:
    """Whether the running backward keeps its graph (``retain_graph=True``), so that saved tensors
    are needed again; True when it cannot be told (tracing, or the private query is missing)."""
    if torch.compiler.is_compiling():
        return True
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


#: what differentiating a fused kernel's gradient raises (the kernels compute first derivatives only)
SECOND_DERIVATIVE_ERROR = (
    "kdfast's fused kernels compute first derivatives only: the gradient of a gradient (backward with "
    "create_graph=True, then differentiating the result) is not supported; use backend='reference' for "
    "double backward")


def wants_gradient(student: torch.Tensor) -> bool:
    """Whether a kernel call must produce ∂ℓ/∂student: grad mode on and the student needs it. Under
    no_grad / inference_mode or for a student without requires_grad, the kernels compute the loss only."""
    return torch.is_grad_enabled() and student.requires_grad


def wide_gradient(student: torch.Tensor) -> bool:
    """fp16 inputs keep their gradient in fp32 until the upstream factor is applied: a loss scale
    (torch.amp.GradScaler's 65536 by default) must multiply before the one rounding to fp16, or small
    entries flush to zero and large ones overflow. bf16 has fp32's exponent range and needs no such care."""
    return student.dtype == torch.float16


@dataclass(frozen=True)
class Reduction:
    """How a kernel's per-row losses become an op's output: ``reduce(loss_rows)``, and the factor
    d output / d loss_row, the same for every live row (the kernel wrote zero gradient rows for the
    others): a Python float when known on the host, else a 0-dim tensor. ``per_row``: the output
    keeps one value per row, so the upstream gradient is a vector."""
    reduce: Callable[[torch.Tensor], torch.Tensor]
    factor: object = 1.0
    per_row: bool = False


class KernelLoss(torch.autograd.Function):
    """Autograd around a kernel returning (loss_rows, grad, *extras) with the gradient computed in the
    forward: ``apply(student, reduction, kernel, *arguments)`` returns ``(reduction.reduce(loss_rows),
    *extras)``, and backward scales the saved gradient by upstream·factor.

    * The upstream factor is applied in fp32 before the gradient's one rounding to the input dtype
      (a 0-dim fp32 factor multiplies half tensors in fp32; fp16 gradients are kept in fp32 until then).
    * When that factor is exactly 1 — ``loss.backward()`` on a reduction whose scale the kernel folded
      in (see :func:`build_losses`) — the saved gradient itself is handed out: no pass, no second
      tensor. It is handed out only when the graph is not kept, since the caller may then modify it
      (``zero_grad(set_to_none=False)``, in-place clipping); with ``retain_graph=True`` every backward
      gets a tensor of its own and the saved gradient stays intact.
    * Second derivatives raise :data:`SECOND_DERIVATIVE_ERROR` when they are asked for.
    """

    @staticmethod
    def forward(ctx, student, reduction, kernel, *arguments):
        loss_rows, grad, *extras = kernel(student, *arguments, compute_grad=True, wide_grad=wide_gradient(student))
        factor = reduction.factor
        ctx.factor_is_tensor = isinstance(factor, torch.Tensor)
        ctx.save_for_backward(grad, *((factor,) if ctx.factor_is_tensor else ()))
        ctx.factor = None if ctx.factor_is_tensor else float(factor)
        ctx.per_row = reduction.per_row
        ctx.input_dtype = student.dtype
        ctx.num_arguments = len(arguments)
        ctx.mark_non_differentiable(*extras)
        return (reduction.reduce(loss_rows), *extras)

    @staticmethod
    def backward(ctx, grad_output, *unused):
        grad, *saved = ctx.saved_tensors
        factor = saved[0] if ctx.factor_is_tensor else ctx.factor
        nothing = (None, None) + (None,) * ctx.num_arguments
        second_order = torch.is_grad_enabled()  # create_graph=True
        with torch.no_grad():
            upstream = grad_output.to(compute_dtype(ctx.input_dtype)) * factor  # fp32, or fp64 for fp64
            if ctx.per_row:
                upstream = upstream.unsqueeze(-1)
            kept = _graph_is_kept() or second_order
            if not ctx.per_row and grad.dtype == ctx.input_dtype and ctx.factor is not None \
                    and _can_inspect(grad_output, grad.numel()) and bool(upstream == 1):
                result = grad.clone() if kept else grad
            elif grad.dtype == ctx.input_dtype and not ctx.per_row:
                result = grad * upstream  # 0-dim fp32: computed in fp32, one rounding, input dtype
            elif not kept and grad.dtype == torch.float32:
                result = grad.mul_(upstream).to(ctx.input_dtype)  # the saved wide gradient is not needed again
            else:
                result = (grad * upstream).to(ctx.input_dtype)
        if second_order:
            # a node that raises if the second-order graph is ever differentiated through here
            # (as torch.autograd.function.once_differentiable does, with kdfast's message)
            alias = result.detach().requires_grad_(True)
            result = torch._C._functions.DelayedError(SECOND_DERIVATIVE_ERROR.encode(), 1)(alias)
        return (result,) + nothing


def _run(kernel: Callable, student: torch.Tensor, reduction: Reduction, *arguments):
    """The kernel through autograd when a gradient is wanted, else its loss only (no gradient pass)."""
    if wants_gradient(student):
        return KernelLoss.apply(student, reduction, kernel, *arguments)
    loss_rows, _, *extras = kernel(student, *arguments, compute_grad=False, wide_grad=False)
    return (reduction.reduce(loss_rows), *extras)


def _counted_rows(valid: torch.Tensor, target: Optional[torch.Tensor]):
    """The number of rows a reduction counts: an int when known on the host without a device sync
    (no target, or a CPU target outside tracing), else a 0-dim tensor."""
    if target is None:
        return valid.shape[0]
    if _can_inspect(valid):
        return int(valid.sum())
    return valid.sum()


def _folded_scale(reduction: str, counted, num_classes: int, mean_kind: str) -> float:
    """The factor the reduction will multiply every counted row's gradient by, when it is known on
    the host (see _counted_rows); else 1."""
    if reduction in ("none", "sum") or isinstance(counted, torch.Tensor):
        return 1.0
    divisor = num_classes if (reduction == "mean" and mean_kind == "kl") else 1
    return 1.0 / (max(counted, 1) * divisor)


def _row_factor(reduction: str, counted, divisor: int, scale: float):
    """d reduce_rows(loss_rows/scale) / d loss_row for a counted row: a float when the count is known
    on the host (1 when the scale was folded into the kernel), else a 0-dim fp32 tensor."""
    if reduction in ("none", "sum"):
        return 1.0 / scale
    per_row = divisor if reduction == "mean" else 1
    if isinstance(counted, torch.Tensor):
        return 1.0 / (scale * per_row * counted.clamp_min(1).to(torch.float32))
    return 1.0 / (scale * per_row * max(counted, 1))


def _scaled(params: RowSoftmaxParams, scale: float) -> RowSoftmaxParams:
    """``params`` with its three term weights multiplied by ``scale``."""
    if scale == 1.0:
        return params
    return replace(params, kl_weight=params.kl_weight * scale, ce_weight=params.ce_weight * scale,
                   uniform_weight=params.uniform_weight * scale)


def _sum_over_items(row_softmax: Callable, student: torch.Tensor, teacher, target, params: RowSoftmaxParams,
                    valid: torch.Tensor, num_items):
    """Σ of the counted rows' losses / ``num_items_in_batch`` (Hugging Face's gradient-accumulation
    divisor). A Python number (or a CPU tensor, read for free) is folded into the kernel's weights,
    so the kernel writes the final gradient; a tensor on an accelerator stays there (no host sync)
    and backward applies it as one 0-dim factor."""
    dtype = compute_dtype(student.dtype)
    if isinstance(num_items, torch.Tensor) and not _can_inspect(num_items):
        inverse = 1.0 / num_items.to(device=student.device, dtype=torch.float32)
        scale, factor = 1.0, inverse
    else:
        scale = 1.0 / float(num_items)
        factor = 1.0
    params = _scaled(params, scale)

    def reduce(loss_rows):
        rows = torch.where(valid, loss_rows.to(dtype), torch.zeros((), dtype=dtype, device=loss_rows.device))
        total = rows.sum()
        # the folded rows already carry 1/num_items
        return total * factor.to(dtype) if isinstance(factor, torch.Tensor) else total

    output, = _run(row_softmax, student, Reduction(reduce, factor if isinstance(factor, torch.Tensor) else 1.0),
                   teacher, target, params)
    return output


def build_losses(row_softmax: Callable, feature_centre: Callable, landmark_gram: Callable) -> dict:
    """The public losses (reference signatures) on top of a backend's three kernels."""

    def row_loss(name, student_logits, teacher_logits, target, options):
        params, reduction, mean_kind = row_softmax_params(name, **options)
        teacher = None if teacher_logits is None else teacher_logits.detach()
        target = None if target is None else target.long()
        valid, _ = valid_rows(target, options.get("ignore_index"), student_logits.shape[0], student_logits.device)
        num_classes = student_logits.shape[-1]
        divisor = num_classes if mean_kind == "kl" else 1
        num_items = options.get("num_items_in_batch")
        if num_items is not None and reduction == "batchmean":
            return _sum_over_items(row_softmax, student_logits, teacher, target, params, valid, num_items)
        # The gradient is linear in the three weights: scaling them by the reduction's factor makes
        # the kernel write the final gradient, so a plain loss.backward() needs no pass over it.
        counted = _counted_rows(valid, target)
        scale = _folded_scale(reduction, counted, num_classes, mean_kind)
        params = _scaled(params, scale)
        dtype = compute_dtype(student_logits.dtype)

        def reduce(loss_rows):
            return reduce_rows(loss_rows.to(dtype) / scale, valid, reduction, divisor)

        output, = _run(row_softmax, student_logits, Reduction(reduce, _row_factor(reduction, counted, divisor, scale),
                                                              reduction == "none"), teacher, target, params)
        return output

    def divergence_loss(student_logits, teacher_logits, target=None, **options):
        # the per-model logit transforms (scale, softcap) before the kernel; autograd chains them
        student = transform_logits(student_logits, options["student_logit_scale"], options["student_softcap"])
        teacher = transform_logits(teacher_logits.detach(), options["teacher_logit_scale"],
                                   options["teacher_softcap"])
        return row_loss("divergence_loss", student, teacher, target, options)

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
        dtype = compute_dtype(student_features.dtype)

        def reduce(loss_rows):
            return reduce_rows(loss_rows.to(dtype), valid, reduction)

        # the kernel writes loss 0 and a zero gradient row for the ignored rows itself
        output, = _run(feature_centre, student_features,
                       Reduction(reduce, _row_factor(reduction, _counted_rows(valid, target), 1, 1.0),
                                 reduction == "none"),
                       teacher_features.detach(), target, centers.detach(), eps, kernel_ignore_index(ignore_index))
        return output

    def nystrom_loss(student_features, teacher_features, student_landmarks, teacher_landmarks, *,
                     kind="smooth_l1", normalize=True, reduction="sum", beta=1.0, eps=1e-12):
        dtype = compute_dtype(student_features.dtype)
        arguments = (teacher_features.detach(), student_landmarks.detach(), teacher_landmarks.detach())
        if kind == "fro":  # sqrt of the whole sum: the kernel's sums unweighted, the chain rule here
            rows = Reduction(lambda loss_rows: loss_rows.to(dtype), 1.0, per_row=True)
            loss_rows, teacher_norm = _run(landmark_gram, student_features, rows, *arguments, "sq_fro", beta, 1.0,
                                           False, eps)
            scale = 1 / (teacher_norm.to(dtype) + eps) if normalize else 1.0
            # R = 0 takes sqrt(tiny) (a zero gradient, not NaN); a where, not a clamp, so that a NaN
            # sum keeps a NaN gradient
            total = loss_rows.sum()
            return torch.where(total == 0, torch.finfo(dtype).tiny, total).sqrt() * scale
        # the kernel applies the mean's divisor and the normalisation, so loss.backward() needs no pass
        weight = 1 / max(student_features.shape[0] * student_landmarks.shape[0], 1) if reduction == "mean" else 1.0
        if reduction == "none":
            rows = Reduction(lambda loss_rows: loss_rows.to(dtype), 1.0, per_row=True)
        else:
            rows = Reduction(lambda loss_rows: loss_rows.to(dtype).sum(), 1.0)
        output, _ = _run(landmark_gram, student_features, rows, *arguments, kind, beta, weight, normalize, eps)
        return output

    return dict(kd_loss=kd_loss, skd_loss=skd_loss, divergence_loss=divergence_loss, partial_teacher_loss=partial_teacher_loss,
                label_smoothing_loss=label_smoothing_loss, reweighted_ce_loss=reweighted_ce_loss,
                nd_loss=nd_loss, nystrom_loss=nystrom_loss)
