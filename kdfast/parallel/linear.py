"""Fused-linear distillation losses with a vocabulary-parallel LM head, and DTensor (FSDP2) heads.

**Vocabulary-parallel heads** (Megatron's ``ColumnParallelLinear`` layout): rank r of the group
holds rows [start_r, start_r + V_r) of both LM heads (and biases); the hidden states are the same on
every rank. A chunk of rows at a time, each rank forms its own logit columns z_r = h·W_rᵀ (+ b_r),
the row loss runs through :mod:`kdfast.parallel.vocab` (its collectives carry O(rows) statistics,
never logits), and the local logit gradient G_r gives

    ∂L/∂W_r = G_rᵀ·h,  ∂L/∂b_r = Σ_rows G_r   (local: no communication),
    ∂L/∂h = Σ_r G_r·W_r                       (one SUM all-reduce of [N, H] per call).

The hidden-state gradient returned is already summed over the group: do not all-reduce it again
(a Megatron ``copy_to_tensor_model_parallel_region`` before this loss would).

**DTensor heads** (FSDP2 leaves each parameter as a DTensor sharded on dim 0 outside its module's
forward): :func:`full_weight` gathers it once per call with ``DTensor.full_tensor`` and declares
its gradient *partial*, so the backward reduce-scatters the weight gradient back to the
parameter's own placement, averaged over the mesh as FSDP2 averages every other gradient. A
``fully_shard``-ed student therefore trains correctly when the loss is called outside
``lm_head.forward``. DeepSpeed ZeRO-3 keeps plain tensors with empty storage instead; gather them
with ``deepspeed.zero.GatheredParameters([lm_head.weight], modifier_rank=None)`` around the call.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference._common import compute_dtype, valid_rows
from ..topk import reduce_loss_rows, row_weights
from .vocab import NEG_INF, _check_in_vocabulary, _issue, form_for, is_dtensor, parallel_rows, vocab_shard

__all__ = ["full_weight", "vocab_parallel_linear_loss"]


class _AverageGradient(torch.autograd.Function):
    """Identity forward; the backward divides the gradient by the data-parallel world size."""

    @staticmethod
    def forward(ctx, tensor, world):
        ctx.world = world
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


def full_weight(weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A DTensor parameter (FSDP2) as one full local tensor, gathered once; its gradient goes back
    to the parameter's placement averaged over the mesh (a reduce-scatter for Shard(0)). Plain
    tensors are returned unchanged."""
    if weight is None or not is_dtensor(weight):
        return weight
    from torch.distributed.tensor import Partial
    mesh = weight.device_mesh
    if not (weight.requires_grad and torch.is_grad_enabled()):
        with torch.no_grad():
            return weight.full_tensor()
    full = weight.full_tensor(grad_placements=[Partial()] * mesh.ndim)
    return _AverageGradient.apply(full, mesh.size())


class _VocabParallelLinear(torch.autograd.Function):
    """Forward: the loss and the student's gradients, chunk by chunk (the hidden-state gradient
    all-reduced once at the end); backward: scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem):
        want = ctx.needs_input_grad[:3]
        compute_grad = any(want)
        rows = hidden.shape[0]
        dtype = compute_dtype(hidden.dtype)
        gemm_weight = weight.to(dtype)
        gemm_bias = None if bias is None else bias.to(dtype)
        grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if want[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if want[2] else None
        loss_rows = torch.empty(rows, dtype=dtype, device=hidden.device)
        vocab = None
        for start in range(0, rows, problem["chunk_size"]):
            stop = min(start + problem["chunk_size"], rows)
            chunk = hidden[start:stop].to(dtype)
            logits = torch.nn.functional.linear(chunk, gemm_weight, gemm_bias)
            loss_rows[start:stop], grad, vocab = problem["run_chunk"](logits, start, stop, compute_grad)
            if not compute_grad:
                continue
            if want[0]:
                grad_hidden[start:stop] = grad @ gemm_weight
            if want[1]:
                grad_weight.addmm_(grad.T, chunk)
            if want[2]:
                grad_bias += grad.sum(0)
        if want[0]:
            _issue(grad_hidden, "sum", problem["shard"].group)  # ∂L/∂h = Σ_r G_r·W_r: the one [N, H] collective
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*[torch.empty(0) if g is None else g for g in (grad_hidden, grad_weight, grad_bias)])
        ctx.present = tuple(want)
        return problem["reduce"](loss_rows, vocab)

    @staticmethod
    def backward(ctx, grad_output):
        grads = []
        for saved, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes):
            grads.append((saved * grad_output.to(saved.dtype)).to(dtype) if present else None)
        return (*grads, None)


def vocab_parallel_linear_loss(loss_name: str, hidden: torch.Tensor, weight: torch.Tensor, bias, teacher, target, *,
                               group, vocab_start_index: Optional[int], chunk_size: Optional[int], reduction: str,
                               num_items_in_batch=None, ignore_index: Optional[int] = -100, **options) -> torch.Tensor:
    """A fused-linear loss whose LM heads are this rank's vocabulary rows. ``teacher`` is
    (teacher_hidden, teacher_weight, teacher_bias) for the dense losses, (indices, log-probs) for
    the top-k one; ``hidden`` [N, H] and ``target`` [N] are the same on every rank."""
    rows = hidden.shape[0]
    shard = vocab_shard(group, vocab_start_index, weight.shape[0])
    dtype = compute_dtype(hidden.dtype)
    flat_target = None if target is None else target.reshape(-1).long()
    valid, _ = valid_rows(flat_target, ignore_index, rows, hidden.device)
    if loss_name == "topk_divergence_loss":
        indices, logprobs = teacher
    else:
        teacher_hidden, teacher_weight, teacher_bias = teacher
        if teacher_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"with vocab_parallel_group the two LM heads must hold the same vocabulary rows: "
                             f"student_weight has {weight.shape[0]} rows, teacher_weight {teacher_weight.shape[0]}")
        teacher_weight = teacher_weight.detach().to(dtype)
        teacher_bias = None if teacher_bias is None else teacher_bias.detach().to(dtype)
    if chunk_size is None:
        chunk_size = max(1, min(rows, max(512, (1 << 24) // max(weight.shape[0], 1))))

    weights = []  # d(reduced loss)/dℓ_n of every row, once the global vocabulary size is known

    def chunk_weights(vocab, start, stop):
        if not weights:
            weights.append(row_weights(valid, reduction, vocab, num_items_in_batch, dtype))
        return weights[0][start:stop]

    def run_chunk(logits, start, stop, compute_grad):
        chunk_target = None if flat_target is None else flat_target[start:stop]
        if loss_name == "topk_divergence_loss":
            form = form_for(loss_name, options, indices[start:stop], logprobs[start:stop])
            teacher_logits = None
        else:
            form = form_for(loss_name, options)
            with torch.no_grad():
                teacher_logits = torch.nn.functional.linear(teacher_hidden[start:stop].detach().to(dtype),
                                                            teacher_weight, teacher_bias)
        loss_rows, grad, vocab = parallel_rows(form, logits, teacher_logits, chunk_target, ignore_index, shard,
                                               lambda vocab: chunk_weights(vocab, start, stop),
                                               compute_grad=compute_grad, grad_dtype=dtype)
        if chunk_target is not None:
            _check_in_vocabulary("target", chunk_target, valid[start:stop], vocab)
        if loss_name == "topk_divergence_loss":
            _check_in_vocabulary("teacher_topk_indices", form.indices, form.logprobs > NEG_INF, vocab)
        return loss_rows, grad, vocab

    def reduce(loss_rows, vocab):
        if vocab is None:  # no rows
            vocab = torch.ones((), dtype=dtype, device=hidden.device)
        return reduce_loss_rows(loss_rows, valid, reduction, vocab, num_items_in_batch)

    problem = dict(chunk_size=chunk_size, run_chunk=run_chunk, reduce=reduce, shard=shard)
    return _VocabParallelLinear.apply(hidden, weight, bias, problem)
