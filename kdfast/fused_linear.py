"""LLM-scale KD and SKD that never materialise the [N, V] logits.

The student's and the teacher's output projections (``hidden @ weight.T + bias``) are applied a
chunk of rows at a time; the fused row-softmax kernel of the chosen backend turns each chunk of
logits into per-row losses and their gradient, and the gradients of the student's hidden states,
weight and bias are accumulated during the forward. Peak extra memory is a few chunks of logits
plus the gradients themselves, instead of several [N, V] tensors.

Rules worth knowing:
- Vocabulary sizes may differ: for the KD term, the smaller side's logits are padded with zeros
  up to the larger vocabulary V (as Liger-Kernel's distillation losses do); padded classes take
  part in its softmax (and in SKD's row statistics) like any logit of value 0. The CE term
  (weight 1 − α) is the student's own: over its V_s classes only, as if there were no teacher
  (SKD: on its own normalised logits). Per row, with z^s the student's V_s logits, z̄ the
  zero-padded logits of both sides and h = κ·normalize(·) for SKD (h = z for KD):
      ℓ = α·T²·KL(σ_T(h(z̄^t)) ‖ σ_T(h(z̄^s))) + (1 − α)·(−log σ(h(z^s))_y),
  and ``reduction="mean"`` divides the sum of ℓ by rows·V.
- DTensor weights (FSDP2 parameters, read outside their module's forward) are gathered once per
  call and their gradients go back to the parameter's placement, averaged over the mesh like
  FSDP2's own (:func:`kdfast.parallel.linear.full_weight`). Other sharded weights (FSDP1,
  ZeRO-3) must be gathered by the caller, e.g. inside ``FullyShardedDataParallel.summon_full_params``
  or DeepSpeed's ``GatheredParameters``: a shard would give a different loss.
- ``vocab_parallel_group=``: the heads are this rank's vocabulary rows (tensor parallelism,
  :mod:`kdfast.parallel.linear`).
- No host synchronisation: the number of counted rows stays on the device.
- ``reduction="none"`` is not offered: the weight gradient sums over rows during the forward, so
  per-row grad_outputs cannot be applied afterwards. Use ``"sum"`` and weight rows yourself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks
from ._dispatch import resolve_kernel
from .backends._fused import RowSoftmaxParams, row_softmax_params
from .reference import rowsoftmax as reference
from .reference._common import cross_entropy_rows, nan_where, prepare_rows, reduce_rows
from .reference.divergence import divergence_loss, transform_logits

REDUCTIONS = ("sum", "mean", "batchmean")


#: fewer rows than this make the per-chunk GEMMs (especially the weight gradient, whose inner
#: dimension is the chunk) run below the machine's matmul rate; measured on CPU (2 threads):
#: N=1024, H=256, V=8192 fp32 took 250 ms with 32-row chunks and 170 ms with 128–2048 (2026-11-22);
#: N=4096, H=1024, V=32000 forward KL took 8.98 s with 256-row chunks, 7.68 s with 512 and 7.92 s
#: with 1024, against 7.62 s for its four unchunked GEMMs (2026-12-07)
MIN_CHUNK_ROWS = 512

#: rows per row-kernel call inside a chunk: the kernel's gradient output is this many rows, not a
#: whole chunk (see _FusedLinearRowSoftmax.forward)
KERNEL_ROWS = 128


def default_chunk_size(rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: about N·H/V rounded up to a power of two, so that a chunk of logits is about
    as large as the hidden states (Liger-Kernel's rule, PR #425), but at least MIN_CHUNK_ROWS,
    and at most N."""
    if rows <= 0:
        return 1
    per_chunk = math.ceil(rows / math.ceil(vocab / max(hidden, 1)))
    return max(1, min(rows, max(MIN_CHUNK_ROWS, 2 ** math.ceil(math.log2(max(per_chunk, 1))))))


#: low-precision dtypes whose matmuls the CPU may lack instructions for
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _cpu_has_matrix_unit(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (AMX tiles, AVX-512 BF16)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    if dtype == torch.bfloat16:
        return getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return getattr(cpu, "_is_amx_fp16_supported", lambda: False)()


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the chunk GEMMs run in: ``dtype``, except bf16/fp16 on a CPU without matrix
    instructions for it (AVX2, plain AVX-512). There low-precision matmuls take slow fallbacks —
    measured on an AVX2 EPYC, 2026-11-22: ``[256, 4096] @ [4096, 256]`` took 681 ms in bf16 and
    4.6 ms in fp32, ``[256, 32000] @ [32000, 1024]`` 42 s in bf16 — so the weights are upcast to fp32
    once per call (V·H·4 extra bytes per weight) and every GEMM runs in fp32, which is also at
    least as accurate."""
    if device.type == "cpu" and dtype in _LOW_PRECISION and not _cpu_has_matrix_unit(dtype):
        return torch.float32
    return dtype


def _logits(hidden, weight, bias, width):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return _pad(logits, width)


def _logits_into(out, hidden, weight, bias):
    """``hidden @ weight.T (+ bias)`` written into ``out`` [rows, width]; columns past the weight's
    vocabulary are zero (the padding of the smaller vocabulary)."""
    vocab = weight.shape[0]
    target = out if vocab == out.shape[1] else out[:, :vocab]
    if target.is_contiguous():
        if bias is None:
            torch.mm(hidden, weight.T, out=target)
        else:
            torch.addmm(bias, hidden, weight.T, out=target)
    else:
        target.copy_(_logits(hidden, weight, bias, vocab))
    if vocab < out.shape[1]:
        out[:, vocab:].zero_()
    return out


def _pad(logits, width):
    return logits if logits.shape[-1] == width else F.pad(logits, (0, width - logits.shape[-1]))


def split_padded_cross_entropy(params: RowSoftmaxParams, vocab: int, width: int):
    """(parameters of the kernel call on the padded logits, parameters of a second call computing the
    CE term on the student's own ``vocab`` classes, or None when the first call is the whole loss:
    no CE term, or no padding of the student)."""
    if params.ce_weight == 0 or vocab == width:
        return params, None
    own_cross_entropy = RowSoftmaxParams(normalize=params.normalize, multiplier=params.multiplier, eps=params.eps,
                                         ce_weight=params.ce_weight, ignore_index=params.ignore_index)
    return replace(params, ce_weight=0.0), own_cross_entropy


def _cast(tensor, dtype):
    return None if tensor is None else tensor.to(dtype)


@dataclass(frozen=True)
class LogitTransform:
    """One model's logit transform before the temperature: z' = c·tanh(s·z/c) with a softcap c,
    else z' = s·z. A −inf logit (a masked entry) stays −inf."""
    scale: float = 1.0
    softcap: Optional[float] = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply_(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """Transform ``logits`` in place; returns dz'/dz (None when it is the constant ``scale``)."""
        if self.softcap is None:
            if self.scale != 1.0:
                logits.mul_(self.scale)
            return None
        masked = logits == -math.inf
        capped = logits.mul_(self.scale / self.softcap).tanh_()           # t = tanh(s·z/c)
        derivative = torch.square(capped).neg_().add_(1).mul_(self.scale)  # s·(1 − t²)
        capped.mul_(self.softcap).masked_fill_(masked, -math.inf)
        return derivative

    def chain_(self, grad: torch.Tensor, derivative: Optional[torch.Tensor]) -> torch.Tensor:
        """∂ℓ/∂z from ∂ℓ/∂z' in place."""
        if derivative is not None:
            return grad.mul_(derivative)
        return grad.mul_(self.scale) if self.scale != 1.0 else grad


class _FusedLinearRowSoftmax(torch.autograd.Function):
    """Forward computes the loss and all student gradients chunk by chunk; backward rescales them."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                target, kernel, params, reduction, chunk_size, accum_dtype, transforms=(None, None),
                num_items_in_batch=None):
        rows, vocab = student_hidden.shape[0], student_weight.shape[0]
        width = max(vocab, teacher_weight.shape[0])
        want_weight, want_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        student_transform, teacher_transform = (t or LogitTransform() for t in transforms)

        counted = rows if target is None else (target != params.ignore_index).sum()
        divisor = {"sum": 1, "batchmean": 1, "mean": width}[reduction]
        loss_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        if num_items_in_batch is not None and reduction == "batchmean":
            # Hugging Face's gradient-accumulation divisor replaces the count (read on the device)
            items = torch.as_tensor(num_items_in_batch, device=student_hidden.device)
            scale = 1.0 / items.to(loss_dtype)
        elif reduction == "sum":
            scale = torch.ones((), dtype=loss_dtype, device=student_hidden.device)
        elif isinstance(counted, int):
            scale = torch.full((), 1.0 / (max(counted, 1) * divisor), dtype=loss_dtype, device=student_hidden.device)
        else:
            scale = 1.0 / (counted.clamp_min(1).to(loss_dtype) * divisor)

        # Gradients stay unscaled in accum_dtype; the reduction's scale and grad_output are applied
        # together in backward, in fp32, so no low-precision rounding of the scale creeps in.
        grad_hidden = torch.empty(student_hidden.shape, dtype=accum_dtype, device=student_hidden.device)
        grad_weight = torch.zeros(student_weight.shape, dtype=accum_dtype, device=student_weight.device) \
            if want_weight else None
        grad_bias = torch.zeros(vocab, dtype=accum_dtype, device=student_weight.device) if want_bias else None
        total = torch.zeros((), dtype=loss_dtype, device=student_hidden.device)
        gemm_dtype = matmul_dtype(student_hidden.dtype, student_hidden.device)
        gemm_weight, gemm_bias = _cast(student_weight, gemm_dtype), _cast(student_bias, gemm_dtype)
        gemm_teacher_weight, gemm_teacher_bias = _cast(teacher_weight, gemm_dtype), _cast(teacher_bias, gemm_dtype)

        padded_params, own_cross_entropy_params = split_padded_cross_entropy(params, vocab, width)
        # Both chunks of logits live in two buffers allocated once per call: a fresh [chunk, V]
        # tensor per chunk costs the allocator's page faults and zeroing every time.
        chunk_rows = min(chunk_size, rows)
        student_buffer = torch.empty((chunk_rows, width), dtype=gemm_dtype, device=student_hidden.device)
        teacher_buffer = torch.empty((chunk_rows, width), dtype=gemm_dtype, device=student_hidden.device)
        direct_grad_hidden = accum_dtype == gemm_dtype
        kernel_rows = max(1, min(chunk_rows, KERNEL_ROWS))
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            hidden = student_hidden[start:stop].to(gemm_dtype)
            student_logits = _logits_into(student_buffer[:stop - start], hidden, gemm_weight, gemm_bias)
            derivative = student_transform.apply_(student_logits[:, :vocab])
            teacher_logits = _logits_into(teacher_buffer[:stop - start], teacher_hidden[start:stop].to(gemm_dtype),
                                          gemm_teacher_weight, gemm_teacher_bias)
            teacher_transform.apply_(teacher_logits[:, :teacher_weight.shape[0]])
            chunk_target = None if target is None else target[start:stop]
            # The row kernel runs on slices of the chunk and each slice's gradient overwrites that
            # slice's student logits (read by then): the GEMMs see the whole chunk, while the
            # kernel's own gradient output is a slice, not a third [chunk, V] tensor.
            for first in range(0, stop - start, kernel_rows):
                rows_here = slice(first, min(first + kernel_rows, stop - start))
                slice_target = None if chunk_target is None else chunk_target[rows_here]
                student_rows = student_logits[rows_here]
                loss_rows, grad_rows = kernel(student_rows, teacher_logits[rows_here], slice_target, padded_params)
                if own_cross_entropy_params is not None:
                    cross_entropy_rows, cross_entropy_grad = kernel(student_rows[:, :vocab].contiguous(), None,
                                                                    slice_target, own_cross_entropy_params)
                    loss_rows = loss_rows + cross_entropy_rows
                    grad_rows[:, :vocab] += cross_entropy_grad
                if not student_transform.identity:
                    student_transform.chain_(grad_rows[:, :vocab], None if derivative is None
                                             else derivative[rows_here])
                student_rows.copy_(grad_rows)
                total += loss_rows.sum(dtype=loss_dtype)
                del grad_rows
            grad_logits = student_logits[:, :vocab]
            del teacher_logits, derivative
            if direct_grad_hidden:
                torch.mm(grad_logits, gemm_weight, out=grad_hidden[start:stop])
            else:
                grad_hidden[start:stop] = grad_logits @ gemm_weight
            if want_weight:
                grad_weight.addmm_(grad_logits.T.to(accum_dtype), hidden.to(accum_dtype))
            if want_bias:
                grad_bias += grad_logits.sum(0, dtype=accum_dtype)
            del grad_logits, student_logits

        del student_buffer, teacher_buffer
        del gemm_weight, gemm_teacher_weight
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype, student_weight.dtype)
        ctx.present = (True, want_weight, want_bias)
        ctx.save_for_backward(scale, *[g if g is not None else torch.empty(0) for g in
                                       (grad_hidden, grad_weight, grad_bias)])
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        scale, *saved = ctx.saved_tensors
        factor = grad_output.to(scale.dtype) * scale
        grads = [(g * factor.to(g.dtype)).to(dtype) if present else None
                 for g, present, dtype in zip(saved, ctx.present, ctx.dtypes)]
        return (*grads,) + (None,) * 11


def _check(student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias, teacher_bias,
           reduction, chunk_size, ignore_index, num_classes=None):
    _checks.tensor("student_hidden", student_hidden, min_ndim=1)
    _checks.tensor("student_weight", student_weight, ndim=2)
    _checks.tensor("teacher_hidden", teacher_hidden, min_ndim=1)
    _checks.tensor("teacher_weight", teacher_weight, ndim=2)
    for name, value in (("student_weight", student_weight), ("teacher_hidden", teacher_hidden),
                        ("teacher_weight", teacher_weight)):
        _checks.same_dtype_device(name, value, "student_hidden", student_hidden)
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight has shape {tuple(student_weight.shape)}: its second dimension must be "
                         f"the hidden size {student_hidden.shape[-1]} of student_hidden")
    if teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(f"teacher_weight has shape {tuple(teacher_weight.shape)}: its second dimension must be "
                         f"the hidden size {teacher_hidden.shape[-1]} of teacher_hidden")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden has leading shape {tuple(teacher_hidden.shape[:-1])} but student_hidden "
                         f"has {tuple(student_hidden.shape[:-1])}; they must match (one row per token)")
    for name, bias, weight in (("student_bias", student_bias, student_weight),
                               ("teacher_bias", teacher_bias, teacher_weight)):
        if bias is not None:
            _checks.tensor(name, bias, ndim=1)
            _checks.same_dtype_device(name, bias, "student_hidden", student_hidden)
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"{name} has {bias.shape[0]} entries but the vocabulary has {weight.shape[0]}")
    _checks.choice("reduction", reduction, REDUCTIONS)
    _checks.positive_int("chunk_size", chunk_size, optional=True)
    _checks.ignore_index(ignore_index)
    if target is not None:
        _checks.target("target", target, batch_shape=student_hidden.shape[:-1], ref_name="student_hidden",
                       ref=student_hidden, num_classes=num_classes or student_weight.shape[0],
                       ignore_index=ignore_index)


def _fused_linear(loss_name, student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias,
                  teacher_bias, chunk_size, accum_dtype, backend, options, transforms=(None, None),
                  vocab_parallel_group=None, vocab_start_index=None):
    from .parallel.linear import full_weight, vocab_parallel_linear_loss
    parallel = vocab_parallel_group is not None or vocab_start_index is not None
    if not parallel:  # DTensor (FSDP2) heads: gathered once, gradient back to the parameter's placement
        student_weight, student_bias = full_weight(student_weight), full_weight(student_bias)
        teacher_weight, teacher_bias = full_weight(teacher_weight), full_weight(teacher_bias)
    _check(student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias, teacher_bias,
           options["reduction"], chunk_size, options["ignore_index"],
           num_classes=_checks.UNBOUNDED_CLASSES if parallel else None)
    if options["alpha"] < 1 and target is None:
        raise ValueError(f"target is required when alpha < 1 (alpha={options['alpha']} weights a CE term)")
    if parallel:
        _checks.choice("backend", backend, ("auto", "reference", "cpu", "triton", "cuda"))
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        teacher = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias)
        return vocab_parallel_linear_loss(loss_name, hidden, student_weight, student_bias, teacher, target,
                                          group=vocab_parallel_group, vocab_start_index=vocab_start_index,
                                          chunk_size=chunk_size, **options)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    flat_target = None if target is None else target.reshape(-1).long()
    teacher_weight, teacher_bias = teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()

    kernel = resolve_kernel(backend, "row_softmax", hidden.device)
    if kernel is None:  # the reference: materialise the logits, then the reference loss
        width = max(student_weight.shape[0], teacher_weight.shape[0])
        student_logits = _logits(hidden, student_weight, student_bias, student_weight.shape[0])
        with torch.no_grad():
            teacher_logits = _logits(teacher, teacher_weight, teacher_bias, width)
        return reference_loss(loss_name, student_logits, teacher_logits, flat_target, **options)

    params, reduction, _ = row_softmax_params(loss_name, **options)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], max(student_weight.shape[0], teacher_weight.shape[0]),
                                        hidden.shape[1])
    accum_dtype = student_weight.dtype if accum_dtype is None else torch.promote_types(accum_dtype,
                                                                                       student_weight.dtype)
    return _FusedLinearRowSoftmax.apply(hidden, student_weight, student_bias, teacher, teacher_weight, teacher_bias,
                                        flat_target, kernel, params, reduction, chunk_size, accum_dtype, transforms,
                                        options.get("num_items_in_batch"))


def reference_loss(loss_name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   target: Optional[torch.Tensor], **options) -> torch.Tensor:
    """The fused-linear loss on materialised logits (the specification of the module docstring):
    the reference ``kd_loss`` / ``skd_loss`` on the zero-padded logits, except that the CE term is
    over the student's own classes when its vocabulary is the smaller one."""
    width = teacher_logits.shape[-1] if teacher_logits.shape[-1] > student_logits.shape[-1] \
        else student_logits.shape[-1]
    padded_student = _pad(student_logits, width)
    padded_teacher = _pad(teacher_logits, width)
    loss_function = divergence_loss if loss_name == "divergence_loss" else getattr(reference, loss_name)
    alpha = options["alpha"]
    if alpha == 1 or student_logits.shape[-1] == width:
        return loss_function(padded_student, padded_teacher, target, **options)
    per_row = dict(options, reduction="none")
    distillation_rows = loss_function(padded_student, padded_teacher, target, **dict(per_row, alpha=1.0))
    rows = prepare_rows(student_logits, None, target, options["ignore_index"])
    own_logits = rows.student
    if loss_name == "skd_loss":
        own_logits = reference.normalize_logits(own_logits, options["normalize"], options["multiplier"],
                                                options["eps"])
    if loss_name == "divergence_loss":
        own_logits = transform_logits(own_logits, options["student_logit_scale"], options["student_softcap"])
    cross_entropy = cross_entropy_rows(F.log_softmax(own_logits, dim=-1), rows.target)
    total_rows = alpha * distillation_rows + (1 - alpha) * nan_where(cross_entropy, rows.has_nan)
    return reduce_rows(total_rows, rows.valid, options["reduction"], mean_divisor=width,
                       num_items_in_batch=options.get("num_items_in_batch"))


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                         student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                         temperature: float = 4.0, alpha: float = 1.0, ignore_index: Optional[int] = -100,
                         reduction: str = "batchmean", num_items_in_batch=None, chunk_size: Optional[int] = None,
                         accum_dtype: Optional[torch.dtype] = torch.float32, vocab_parallel_group=None,
                         vocab_start_index: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """:func:`kdfast.kd_loss` of ``student_hidden @ student_weight.T (+ bias)`` against the teacher's
    logits, computed ``chunk_size`` rows at a time (default: :func:`default_chunk_size`).

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias``; the weight and bias
    gradients are accumulated in ``accum_dtype`` (fp32 by default; ``None`` = the weight's dtype).
    ``backend="reference"`` materialises the logits (the specification the fused path is tested
    against); "auto" uses a fused backend when one is available for the device.
    """
    _checks.positive("temperature", temperature)
    _checks.in_unit_interval("alpha", alpha)
    _checks.num_items_in_batch(num_items_in_batch, reduction, student_hidden.device)
    options = dict(temperature=temperature, alpha=alpha, reduction=reduction, ignore_index=ignore_index,
                   num_items_in_batch=num_items_in_batch)
    return _fused_linear("kd_loss", student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                         student_bias, teacher_bias, chunk_size, accum_dtype, backend, options,
                         vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index)


def fused_linear_skd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                          teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                          student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                          temperature: float = 4.0, multiplier: Optional[float] = None, alpha: float = 1.0,
                          eps: float = 1e-7, normalize: str = "layernorm", ignore_index: Optional[int] = -100,
                          reduction: str = "batchmean", num_items_in_batch=None, chunk_size: Optional[int] = None,
                          accum_dtype: Optional[torch.dtype] = torch.float32, vocab_parallel_group=None,
                         vocab_start_index: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """:func:`kdfast.skd_loss` on the output projections, chunked like :func:`fused_linear_kd_loss`.
    ``multiplier=None`` is κ = 2 for ``layernorm`` / ``l2`` and κ = 1 for ``standardize``."""
    _checks.positive("temperature", temperature)
    _checks.in_unit_interval("alpha", alpha)
    _checks.num_items_in_batch(num_items_in_batch, reduction, student_hidden.device)
    _checks.choice("normalize", normalize, _checks.SKD_NORMALIZATIONS)
    _checks.optional_positive("multiplier", multiplier)
    _checks.positive("eps", eps)
    multiplier = reference.default_skd_multiplier(normalize) if multiplier is None else multiplier
    options = dict(temperature=temperature, multiplier=multiplier, alpha=alpha, eps=eps, normalize=normalize,
                   reduction=reduction, ignore_index=ignore_index,
                   num_items_in_batch=num_items_in_batch)
    return _fused_linear("skd_loss", student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                         student_bias, teacher_bias, chunk_size, accum_dtype, backend, options,
                         vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index)


def fused_linear_divergence_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                 teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                                 target: Optional[torch.Tensor] = None, *,
                                 student_bias: Optional[torch.Tensor] = None,
                                 teacher_bias: Optional[torch.Tensor] = None, divergence: str = "forward_kl",
                                 beta: float = 0.5, skew_alpha: float = 0.1, mixed_kl_weight: float = 0.5,
                                 temperature: float = 1.0, t2_scaling: bool = False, alpha: float = 1.0,
                                 reduction: str = "batchmean", num_items_in_batch=None,
                                 ignore_index: Optional[int] = -100, student_logit_scale: float = 1.0,
                                 student_softcap: Optional[float] = None, teacher_logit_scale: float = 1.0,
                                 teacher_softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                                 accum_dtype: Optional[torch.dtype] = torch.float32,
                                 vocab_parallel_group=None, vocab_start_index: Optional[int] = None,
                                 backend: str = "auto") -> torch.Tensor:
    """:func:`kdfast.divergence_loss` of the two models' output projections, never materialising
    the [N, V] logits: per row, with z'^s = transform(student_hidden @ student_weight.T (+ bias)),
    z'^t likewise for the teacher, p = softmax(z'^s/T), q = softmax(z'^t/T),

        ℓ = α·(T² if t2_scaling)·D(p, q) + (1 − α)·CE(z'^s, y),

    D one of the forms of :func:`kdfast.divergence_loss` (forward / reverse / mixed KL, generalized
    JSD(β) as TRL defines it, TVD, skew KL, skew reverse KL) and transform(z) = c·tanh(s·z/c) with a
    softcap c (Gemma), else s·z (a logit scale, Cohere), per model, applied before T; its chain
    rule is applied to each chunk's logit gradient.

    Args:
        student_hidden, teacher_hidden: final hidden states ``[..., H_s]`` and ``[..., H_t]``
            (one row per token; the teacher's are detached).
        student_weight, teacher_weight: the LM heads ``[V_s, H_s]`` and ``[V_t, H_t]``; different
            vocabulary sizes are zero-padded up to the larger one (see the module docstring).
        target: labels ``[...]`` for the CE term (``alpha < 1``) and for ``ignore_index`` rows.
        reduction: ``"batchmean"`` (sum over the counted rows / their number, or /
            ``num_items_in_batch`` when given: a Python number or a 0-dim tensor read on the
            device), ``"sum"``, ``"mean"`` (also / V).
        chunk_size: rows per chunk (default :func:`default_chunk_size`).
        accum_dtype: dtype of the weight and bias gradient accumulators (fp32 by default).
        vocab_parallel_group, vocab_start_index: tensor parallelism (Megatron's
            ``ColumnParallelLinear`` layout): both weights (and biases) are this rank's contiguous
            vocabulary rows starting at global row ``vocab_start_index`` (None: rank·V_r), the hidden
            states and ``target`` the same on every rank. The hidden-state gradient comes back summed
            over the group (one all-reduce per call); see :mod:`kdfast.parallel.linear`.
        backend: ``"reference"`` materialises the logits (the specification); ``"auto"`` a fused
            backend's row kernel on each chunk.

    DTensor weights and biases (FSDP2 parameters outside their module's forward) are gathered once
    per call and their gradients returned with the parameter's placement.

    Shape:
        Output: a scalar.

    Examples::

        >>> h_s, h_t = torch.randn(8, 16, requires_grad=True), torch.randn(8, 32)
        >>> w_s, w_t = torch.randn(100, 16, requires_grad=True), torch.randn(100, 32)
        >>> loss = kdfast.fused_linear_divergence_loss(h_s, w_s, h_t, w_t, divergence="jsd", beta=0.5)
        >>> loss.backward()
    """
    _checks.positive("temperature", temperature)
    _checks.in_unit_interval("alpha", alpha)
    _checks.choice("divergence", divergence, _checks.DIVERGENCES)
    _checks.in_unit_interval("beta", beta)
    _checks.unit_interval_open_above("skew_alpha", skew_alpha)
    _checks.in_unit_interval("mixed_kl_weight", mixed_kl_weight)
    _checks.flag("t2_scaling", t2_scaling)
    _checks.choice("reduction", reduction, REDUCTIONS)
    _checks.num_items_in_batch(num_items_in_batch, reduction, student_hidden.device)
    _checks.positive("student_logit_scale", student_logit_scale)
    _checks.positive("teacher_logit_scale", teacher_logit_scale)
    _checks.optional_positive("student_softcap", student_softcap)
    _checks.optional_positive("teacher_softcap", teacher_softcap)
    options = dict(divergence=divergence, beta=beta, skew_alpha=skew_alpha, mixed_kl_weight=mixed_kl_weight,
                   temperature=temperature, t2_scaling=t2_scaling, alpha=alpha, reduction=reduction,
                   num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                   student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                   teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
    transforms = (LogitTransform(student_logit_scale, student_softcap),
                  LogitTransform(teacher_logit_scale, teacher_softcap))
    return _fused_linear("divergence_loss", student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                         student_bias, teacher_bias, chunk_size, accum_dtype, backend, options, transforms,
                         vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index)
