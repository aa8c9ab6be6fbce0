"""Top-k teacher divergences on the student's output projection, without ever building the [N, V]
logits or projecting a teacher.

A chunk of rows at a time: the student's logits ``hidden @ weight.T (+ bias)`` for the chunk, the
loss and its logit gradient G for the chunk (:func:`kdfast.topk.topk_rows_`, the same function
as :func:`kdfast.topk_divergence_loss`, in place in the chunk's logits buffer), then
``grad_hidden[chunk] = G @ weight``, ``grad_weight += G.T @ hidden[chunk]`` and
``grad_bias += G.sum(0)``, all during the forward. The backward only multiplies them by the
upstream gradient. Three GEMMs per chunk (the dense fused-linear losses need a fourth for the
teacher's logits).

As :mod:`kdfast.fused_linear`: the weights are used as given (gather sharded weights first),
``reduction="none"`` is not offered (the weight gradient sums over rows during the forward), and
bf16/fp16 GEMMs run in fp32 on a CPU without matrix instructions for them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from .functional import _check_topk_options
from .fused_linear import REDUCTIONS, default_chunk_size, matmul_dtype
from .reference._common import compute_dtype, valid_rows
from .reference.topk import topk_divergence_loss as reference_topk_divergence_loss
from .topk import reduce_loss_rows, row_weights, topk_options, topk_rows_

__all__ = ["fused_linear_topk_divergence_loss"]


class _FusedLinearTopK(torch.autograd.Function):
    """Forward: the loss and every student gradient, chunk by chunk; backward: scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, indices, logprobs, target, valid, row_weight, opts, reduce, chunk_size,
                accum_dtype):
        rows, vocab = hidden.shape[0], weight.shape[0]
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        compute_grad = want_hidden or want_weight or want_bias
        gemm_dtype = matmul_dtype(hidden.dtype, hidden.device)
        work_dtype = compute_dtype(gemm_dtype)
        gemm_weight = weight.to(gemm_dtype)
        gemm_bias = None if bias is None else bias.to(gemm_dtype)

        grad_hidden = torch.empty(hidden.shape, dtype=accum_dtype, device=hidden.device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(vocab, dtype=accum_dtype, device=weight.device) if want_bias else None
        loss_rows = torch.empty(rows, dtype=work_dtype, device=hidden.device)
        # one logits buffer for every chunk (no allocation, no page faults per chunk)
        logits = torch.empty((min(chunk_size, rows), vocab), dtype=gemm_dtype, device=hidden.device)
        work = logits if work_dtype == gemm_dtype else torch.empty(logits.shape, dtype=work_dtype,
                                                                    device=hidden.device)
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            chunk = hidden[start:stop].to(gemm_dtype)
            chunk_logits = logits[: stop - start]
            torch.mm(chunk, gemm_weight.T, out=chunk_logits)
            if gemm_bias is not None:
                chunk_logits += gemm_bias
            buffer = work[: stop - start]
            if buffer.data_ptr() != chunk_logits.data_ptr():
                buffer.copy_(chunk_logits)
            loss_rows[start:stop] = topk_rows_(buffer, indices[start:stop], logprobs[start:stop],
                                               None if target is None else target[start:stop], valid[start:stop],
                                               row_weight[start:stop], opts, compute_grad)
            if not compute_grad:
                continue
            grad = buffer if buffer.dtype == gemm_dtype else chunk_logits.copy_(buffer)
            if want_hidden:
                if grad_hidden.dtype == gemm_dtype:
                    torch.mm(grad, gemm_weight, out=grad_hidden[start:stop])
                else:
                    grad_hidden[start:stop] = grad @ gemm_weight
            if want_weight:
                grad_weight.addmm_(grad.T.to(accum_dtype), chunk.to(accum_dtype))
            if want_bias:
                grad_bias += grad.sum(0, dtype=accum_dtype)
        ctx.dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        ctx.present = (want_hidden, want_weight, want_bias)
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)])
        return reduce(loss_rows)

    @staticmethod
    def backward(ctx, grad_output):
        grads = []
        for g, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes):
            grads.append((g * grad_output.to(g.dtype)).to(dtype) if present else None)
        return (*grads,) + (None,) * 9


def _check(student_hidden, student_weight, student_bias, reduction, chunk_size, ignore_index, accum_dtype):
    _checks.tensor("student_hidden", student_hidden, min_ndim=1)
    _checks.tensor("student_weight", student_weight, ndim=2)
    _checks.same_dtype_device("student_weight", student_weight, "student_hidden", student_hidden)
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight has shape {tuple(student_weight.shape)}: its second dimension must be "
                         f"the hidden size {student_hidden.shape[-1]} of student_hidden")
    if student_weight.shape[0] == 0:
        raise ValueError("student_weight must have at least one row (the vocabulary)")
    if student_bias is not None:
        _checks.tensor("student_bias", student_bias, ndim=1)
        _checks.same_dtype_device("student_bias", student_bias, "student_hidden", student_hidden)
        if student_bias.shape[0] != student_weight.shape[0]:
            raise ValueError(f"student_bias has {student_bias.shape[0]} entries but the vocabulary has "
                             f"{student_weight.shape[0]}")
    _checks.choice("reduction", reduction, REDUCTIONS)
    _checks.positive_int("chunk_size", chunk_size, optional=True)
    _checks.ignore_index(ignore_index)
    if accum_dtype is not None and not isinstance(accum_dtype, torch.dtype):
        raise TypeError(f"accum_dtype must be a torch.dtype or None, got {type(accum_dtype).__name__}")


def fused_linear_topk_divergence_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                      teacher_topk_indices: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                                      target: Optional[torch.Tensor] = None, *,
                                      student_bias: Optional[torch.Tensor] = None, divergence: str = "forward_kl",
                                      beta: float = 0.5, mixed_kl_weight: float = 0.5, tail: str = "renormalize",
                                      temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                                      t2_scaling: bool = False, alpha: float = 1.0,
                                      reverse_kl_floor: Optional[float] = None, reduction: str = "batchmean",
                                      num_items_in_batch=None, ignore_index: Optional[int] = -100,
                                      student_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
                                      chunk_size: Optional[int] = None,
                                      accum_dtype: Optional[torch.dtype] = torch.float32,
                                      vocab_parallel_group=None, vocab_start_index: Optional[int] = None,
                                      backend: str = "auto") -> torch.Tensor:
    """:func:`kdfast.topk_divergence_loss` of the logits ``z = student_hidden @ student_weight.T
    (+ student_bias)``, computed ``chunk_size`` rows at a time, without materialising z:

        ℓ_n = α·(T² if t2_scaling)·D_tail(q̃_n, softmax(z'_n/T)) + (1 − α)·CE(z'_n, y_n)

    with the teacher given by its top-k (index, log-prob) pairs and D, the tails and the logit
    transform z' exactly as in :func:`kdfast.topk_divergence_loss`.

    Args:
        student_hidden: [..., H] the student's last hidden states (receive a gradient).
        student_weight: [V, H] the student's output projection (receives a gradient).
        teacher_topk_indices, teacher_topk_logprobs: [..., k] the teacher's top-k.
        target: [...] labels, for ``alpha < 1`` or to skip rows with ``ignore_index``.
        student_bias: [V] optional output bias (receives a gradient).
        reduction: ``"sum"``, ``"mean"`` (÷ rows·V) or ``"batchmean"`` (÷ counted rows, or
            ``num_items_in_batch``).
        chunk_size: rows per chunk (default: :func:`kdfast.fused_linear.default_chunk_size`).
        accum_dtype: dtype of the gradients accumulated over chunks (fp32 by default; ``None`` = the
            weight's dtype).
        backend: ``"reference"`` materialises the logits and runs the reference (the specification
            this function is tested against); any other name runs the fused plain-PyTorch path.
        vocab_parallel_group, vocab_start_index: tensor parallelism: ``student_weight`` (and bias)
            are this rank's vocabulary rows from global row ``vocab_start_index`` (None: rank·V_r);
            hidden states, teacher top-k (global indices) and target are the same on every rank.
            See :mod:`kdfast.parallel.linear`.
        Other options: as :func:`kdfast.topk_divergence_loss`.

    A DTensor weight or bias (FSDP2) is gathered once per call; its gradient keeps its placement.

    Shape:
        student_hidden [..., H], teacher tensors [..., k], target [...]; the output is a scalar.

    Examples::

        >>> hidden = torch.randn(8, 16, requires_grad=True)
        >>> weight = torch.randn(50, 16, requires_grad=True)
        >>> idx = torch.stack([torch.randperm(50)[:4] for _ in range(8)])
        >>> logprobs = torch.log_softmax(torch.randn(8, 50), -1).gather(-1, idx)
        >>> loss = kdfast.fused_linear_topk_divergence_loss(hidden, weight, idx, logprobs, tail="bucket")
        >>> loss.backward()
    """
    from .parallel.linear import full_weight, vocab_parallel_linear_loss
    parallel = vocab_parallel_group is not None or vocab_start_index is not None
    if not parallel:
        student_weight, student_bias = full_weight(student_weight), full_weight(student_bias)
    _check(student_hidden, student_weight, student_bias, reduction, chunk_size, ignore_index, accum_dtype)
    vocab = _checks.UNBOUNDED_CLASSES if parallel else student_weight.shape[0]
    _checks.topk_teacher(teacher_topk_indices, teacher_topk_logprobs, batch_shape=student_hidden.shape[:-1],
                         ref_name="student_hidden", ref=student_hidden, num_classes=vocab)
    _check_topk_options(divergence=divergence, beta=beta, mixed_kl_weight=mixed_kl_weight, tail=tail,
                        temperature=temperature, teacher_temperature=teacher_temperature, t2_scaling=t2_scaling,
                        alpha=alpha, reverse_kl_floor=reverse_kl_floor, reduction=reduction,
                        num_items_in_batch=num_items_in_batch, student_logit_scale=student_logit_scale,
                        student_softcap=student_softcap, target=target, device=student_hidden.device)
    _checks.choice("backend", backend, ("auto", "reference", "cpu", "triton", "cuda"))
    if target is not None:
        _checks.target("target", target, batch_shape=student_hidden.shape[:-1], ref_name="student_hidden",
                       ref=student_hidden, num_classes=vocab, ignore_index=ignore_index)
    options = dict(divergence=divergence, beta=beta, mixed_kl_weight=mixed_kl_weight, tail=tail,
                   temperature=temperature, teacher_temperature=teacher_temperature, t2_scaling=t2_scaling,
                   alpha=alpha, reverse_kl_floor=reverse_kl_floor, reduction=reduction,
                   num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                   student_logit_scale=student_logit_scale, student_softcap=student_softcap)
    k = teacher_topk_indices.shape[-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    indices = teacher_topk_indices.reshape(-1, k).long()
    logprobs = teacher_topk_logprobs.reshape(-1, k).detach()
    flat_target = None if target is None else target.reshape(-1).long()

    if parallel:
        return vocab_parallel_linear_loss("topk_divergence_loss", hidden, student_weight, student_bias,
                                          (indices, logprobs), flat_target, group=vocab_parallel_group,
                                          vocab_start_index=vocab_start_index, chunk_size=chunk_size, **options)
    if backend == "reference":
        logits = hidden @ student_weight.T
        if student_bias is not None:
            logits = logits + student_bias
        return reference_topk_divergence_loss(logits, indices, logprobs, flat_target, **options)

    rows = hidden.shape[0]
    valid, safe_target = valid_rows(flat_target, ignore_index, rows, hidden.device)
    loss_dtype = compute_dtype(hidden.dtype)
    row_weight = row_weights(valid, reduction, vocab, num_items_in_batch, loss_dtype)
    if chunk_size is None:
        chunk_size = default_chunk_size(rows, vocab, hidden.shape[1])
    accum_dtype = student_weight.dtype if accum_dtype is None else torch.promote_types(accum_dtype,
                                                                                       student_weight.dtype)

    def reduce(loss_rows):
        return reduce_loss_rows(loss_rows.to(loss_dtype), valid, reduction, vocab, num_items_in_batch)

    return _FusedLinearTopK.apply(hidden, student_weight, student_bias, indices, logprobs, safe_target, valid,
                                  row_weight, topk_options(**options), reduce, max(1, chunk_size), accum_dtype)
