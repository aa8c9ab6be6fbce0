"""The public ops: check the arguments, pick a backend, call it.

Every op accepts ``backend="auto" | "reference" | "cpu" | "triton" | "cuda"``. Student tensors get
gradients; teacher tensors, centres and landmarks never do. Logit losses accept any number of
leading dimensions (e.g. [batch, tokens, vocab]); ``reduction="none"`` keeps them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from ._dispatch import resolve
from .parallel.vocab import is_dtensor
from .reference.rowsoftmax import default_skd_multiplier
from .regions import l2rkd_mix  # noqa: F401  (re-exported: part of the functional API)

__all__ = [
    "kd_loss", "skd_loss", "partial_teacher_loss", "label_smoothing_loss", "reweighted_ce_loss",
    "nd_loss", "nystrom_loss", "l2rkd_loss", "l2rkd_mix", "divergence_loss", "topk_divergence_loss",
]


def _check_logits(name: str, logits) -> None:
    _checks.tensor(name, logits, min_ndim=1)
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class (last dimension), got shape {tuple(logits.shape)}")


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., C] → [N, C], the layout every backend takes."""
    return logits.reshape(-1, logits.shape[-1])


def _unflatten(loss: torch.Tensor, reduction: str, leading_shape: torch.Size) -> torch.Tensor:
    return loss.reshape(leading_shape) if reduction == "none" else loss


def _check_logit_pair(student_logits, teacher_logits) -> None:
    _check_logits("student_logits", student_logits)
    _checks.tensor("teacher_logits", teacher_logits, min_ndim=1)
    _checks.same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    _checks.same_dtype_device("teacher_logits", teacher_logits, "student_logits", student_logits)


def _check_row_target(target, student_logits, ignore_index, *, required: bool) -> Optional[torch.Tensor]:
    _checks.ignore_index(ignore_index)
    if target is None:
        if required:
            raise ValueError("target is required for this loss (class indices of shape student_logits.shape[:-1])")
        return None
    _checks.target("target", target, batch_shape=student_logits.shape[:-1], ref_name="student_logits",
                   ref=student_logits, num_classes=student_logits.shape[-1], ignore_index=ignore_index)
    return target.reshape(-1)


def _check_distill_options(temperature, alpha, reduction, target) -> None:
    _checks.positive("temperature", temperature)
    _checks.in_unit_interval("alpha", alpha)
    _checks.choice("reduction", reduction, _checks.ROW_REDUCTIONS)
    if alpha < 1 and target is None:
        raise ValueError(f"target is required when alpha < 1 (alpha={alpha} weights a CE term on the labels)")


def _run_row_loss(loss_name: str, backend: str, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                  flat_target: Optional[torch.Tensor], **options) -> torch.Tensor:
    """Dispatch a checked row-softmax loss on [N, C] rows; "none" gets the leading shape back."""
    op = resolve(backend, loss_name, student_logits.device)
    teacher = () if teacher_logits is None else (_rows(teacher_logits),)
    loss = op(_rows(student_logits), *teacher, flat_target, **options)
    return _unflatten(loss, options["reduction"], student_logits.shape[:-1])


def _is_vocab_parallel(student_logits, vocab_parallel_group, vocab_start_index) -> bool:
    """The vocabulary-parallel path is taken for a process group, a start index or a DTensor input."""
    return vocab_parallel_group is not None or vocab_start_index is not None or is_dtensor(student_logits)


def _run_vocab_parallel(loss_name: str, student_logits, teacher_logits, target, *, vocab_parallel_group,
                        vocab_start_index, backend, **options) -> torch.Tensor:
    """Check the local shards and run the vocabulary-parallel form (plain PyTorch ops and
    torch.distributed collectives on every backend; ``backend`` is checked, then unused)."""
    from .parallel.vocab import local_logits, vocab_parallel_loss
    _check_backend_name(backend)
    student_logits, teacher_logits, group, start = local_logits(student_logits, teacher_logits,
                                                                vocab_parallel_group, vocab_start_index)
    # a rank may hold no column at all (V < P): only the other ranks' checks could tell it apart
    _checks.tensor("student_logits", student_logits, min_ndim=1)
    _checks.tensor("teacher_logits", teacher_logits, min_ndim=1)
    _checks.same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    _checks.same_dtype_device("teacher_logits", teacher_logits, "student_logits", student_logits)
    if target is not None:  # global labels: the upper bound is checked once the vocabulary size is reduced
        _checks.target("target", target, batch_shape=student_logits.shape[:-1], ref_name="student_logits",
                       ref=student_logits, num_classes=_checks.UNBOUNDED_CLASSES,
                       ignore_index=options["ignore_index"])
    return vocab_parallel_loss(loss_name, student_logits, teacher_logits, target, group=group,
                               vocab_start_index=start, **options)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: Optional[torch.Tensor] = None,
            *, temperature: float = 4.0, alpha: float = 1.0, reduction: str = "batchmean",
            ignore_index: Optional[int] = -100, num_items_in_batch=None, vocab_parallel_group=None,
            vocab_start_index: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Hinton KD: α·T²·KL(σ_T(z^t) ‖ σ_T(z^s)) + (1 − α)·CE(z^s, y).

    ``target`` is needed only when ``alpha < 1`` or to mask rows with ``ignore_index``.
    ``batchmean`` divides by the counted rows, ``mean`` also by C (torch.nn.KLDivLoss convention).
    With ``vocab_parallel_group`` (or DTensor logits sharded on the last dimension) both logit
    tensors are this rank's vocabulary shard (see :mod:`kdfast.parallel.vocab`).
    """
    _checks.tensor("student_logits", student_logits, min_ndim=1)  # the rest once local
    _check_distill_options(temperature, alpha, reduction, target)
    _checks.num_items_in_batch(num_items_in_batch, reduction, student_logits.device)
    if _is_vocab_parallel(student_logits, vocab_parallel_group, vocab_start_index):
        return _run_vocab_parallel("kd_loss", student_logits, teacher_logits, target,
                                   vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index,
                                   backend=backend, temperature=temperature, alpha=alpha, reduction=reduction,
                                   ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
    _check_logit_pair(student_logits, teacher_logits)
    flat_target = _check_row_target(target, student_logits, ignore_index, required=False)
    return _run_row_loss("kd_loss", backend, student_logits, teacher_logits, flat_target,
                        temperature=temperature, alpha=alpha, reduction=reduction, ignore_index=ignore_index,
                        num_items_in_batch=num_items_in_batch)


def skd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: Optional[torch.Tensor] = None,
             *, temperature: float = 4.0, multiplier: Optional[float] = None, alpha: float = 1.0,
             eps: float = 1e-7, normalize: str = "layernorm", reduction: str = "batchmean",
             ignore_index: Optional[int] = -100, num_items_in_batch=None, vocab_parallel_group=None,
             vocab_start_index: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Spherical KD: α·T²·KL(σ_T(h^t) ‖ σ_T(h^s)) + (1 − α)·CE(h^s, y) with h = κ·normalize(z) for
    both networks (the CE term at T = 1).

    Args:
        normalize: ``"layernorm"`` (official SKD): (z − μ)/√(var + ε), biased var; ``"l2"``
            (uncentred): z/max(‖z‖, ε); ``"standardize"`` (logit standardisation):
            (z − μ)/(σ + ε), unbiased σ.
        multiplier: κ. ``None`` (default) takes each mode's published value: κ = 2 for
            ``"layernorm"`` and ``"l2"`` (SKD), κ = 1 for ``"standardize"``, whose official code has
            no multiplier — an explicit κ there equals logit standardisation at temperature T/κ.
        vocab_parallel_group, vocab_start_index: both logit tensors are this rank's vocabulary shard
            (or DTensors sharded on the last dimension); see :mod:`kdfast.parallel.vocab`.
    """
    _checks.tensor("student_logits", student_logits, min_ndim=1)  # the rest once local
    _check_distill_options(temperature, alpha, reduction, target)
    _checks.choice("normalize", normalize, _checks.SKD_NORMALIZATIONS)
    _checks.optional_positive("multiplier", multiplier)
    _checks.positive("eps", eps)
    multiplier = default_skd_multiplier(normalize) if multiplier is None else multiplier
    _checks.num_items_in_batch(num_items_in_batch, reduction, student_logits.device)
    if _is_vocab_parallel(student_logits, vocab_parallel_group, vocab_start_index):
        return _run_vocab_parallel("skd_loss", student_logits, teacher_logits, target,
                                   vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index,
                                   backend=backend, temperature=temperature, multiplier=multiplier, alpha=alpha,
                                   eps=eps, normalize=normalize, reduction=reduction, ignore_index=ignore_index,
                                   num_items_in_batch=num_items_in_batch)
    _check_logit_pair(student_logits, teacher_logits)
    flat_target = _check_row_target(target, student_logits, ignore_index, required=False)
    return _run_row_loss("skd_loss", backend, student_logits, teacher_logits, flat_target,
                        temperature=temperature, multiplier=multiplier, alpha=alpha, eps=eps, normalize=normalize,
                        reduction=reduction, ignore_index=ignore_index,
                        num_items_in_batch=num_items_in_batch)


def partial_teacher_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
                         temperature: float = 1.0, alpha: float = 0.5, reduction: str = "batchmean",
                         ignore_index: Optional[int] = -100, num_items_in_batch=None, backend: str = "auto") -> torch.Tensor:
    """KD-pt (Tang et al.): KD against the partial teacher q^pt, which keeps only the teacher's
    true-class probability ρ and spreads 1 − ρ evenly over the other classes."""
    _check_logit_pair(student_logits, teacher_logits)
    _check_distill_options(temperature, alpha, reduction, target)
    _checks.num_items_in_batch(num_items_in_batch, reduction, student_logits.device)
    flat_target = _check_row_target(target, student_logits, ignore_index, required=True)
    return _run_row_loss("partial_teacher_loss", backend, student_logits, teacher_logits, flat_target,
                        temperature=temperature, alpha=alpha, reduction=reduction, ignore_index=ignore_index,
                        num_items_in_batch=num_items_in_batch)


def label_smoothing_loss(student_logits: torch.Tensor, target: torch.Tensor, *, smoothing: float = 0.1,
                         reduction: str = "mean", ignore_index: Optional[int] = -100,
                         num_items_in_batch=None, backend: str = "auto") -> torch.Tensor:
    """CE against (1 − ε)·e_y + ε/C (equals torch's cross_entropy with label_smoothing=ε).
    ``mean`` and ``batchmean`` both average over the counted rows, as torch's CE does."""
    _check_logits("student_logits", student_logits)
    _checks.in_unit_interval("smoothing", smoothing)
    _checks.choice("reduction", reduction, _checks.ROW_REDUCTIONS)
    _checks.num_items_in_batch(num_items_in_batch, reduction, student_logits.device)
    flat_target = _check_row_target(target, student_logits, ignore_index, required=True)
    return _run_row_loss("label_smoothing_loss", backend, student_logits, None, flat_target,
                        smoothing=smoothing, reduction=reduction, ignore_index=ignore_index,
                        num_items_in_batch=num_items_in_batch)


def reweighted_ce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
                       alpha: float = 0.5, temperature: float = 1.0, eps: float = 1e-6, reduction: str = "mean",
                       ignore_index: Optional[int] = -100, num_items_in_batch=None, backend: str = "auto") -> torch.Tensor:
    """Instance re-weighted CE (Tang et al.): w_i·CE_i with the detached weight
    w_i = 1 − α(1 − ρ_i)/max(1 − p_{y,i}, eps), ρ_i the teacher's true-class probability at T."""
    _check_logit_pair(student_logits, teacher_logits)
    _checks.in_unit_interval("alpha", alpha)
    _checks.positive("temperature", temperature)
    _checks.positive("eps", eps)
    _checks.choice("reduction", reduction, _checks.ROW_REDUCTIONS)
    _checks.num_items_in_batch(num_items_in_batch, reduction, student_logits.device)
    flat_target = _check_row_target(target, student_logits, ignore_index, required=True)
    return _run_row_loss("reweighted_ce_loss", backend, student_logits, teacher_logits, flat_target,
                        alpha=alpha, temperature=temperature, eps=eps, reduction=reduction,
                        ignore_index=ignore_index,
                        num_items_in_batch=num_items_in_batch)


def divergence_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    target: Optional[torch.Tensor] = None, *, divergence: str = "forward_kl", beta: float = 0.5,
                    skew_alpha: float = 0.1, mixed_kl_weight: float = 0.5, temperature: float = 1.0,
                    t2_scaling: bool = False, alpha: float = 1.0, reduction: str = "batchmean",
                    num_items_in_batch=None, ignore_index: Optional[int] = -100,
                    student_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
                    teacher_logit_scale: float = 1.0, teacher_softcap: Optional[float] = None,
                    vocab_parallel_group=None, vocab_start_index: Optional[int] = None,
                    backend: str = "auto") -> torch.Tensor:
    """LLM distillation divergences: α·(T² if t2_scaling)·D(p ‖ q) + (1 − α)·CE(z'^s, y), with
    p = softmax(z'^s/T), q = softmax(z'^t/T) and z' = c·tanh(s·z/c) (or s·z without a softcap),
    each model with its own scale s and softcap c.

    Args:
        divergence: ``"forward_kl"`` KL(q‖p), ``"reverse_kl"`` KL(p‖q), ``"mixed_kl"``
            (w·forward + (1 − w)·reverse, w = ``mixed_kl_weight``), ``"jsd"`` (generalized JSD(β)
            as TRL's ``generalized_jsd_loss``: m = β·q + (1 − β)·p, β·KL(q‖m) + (1 − β)·KL(p‖m);
            β = 0 is the forward KL, β = 1 the reverse KL), ``"tvd"`` ½·Σ|p − q|,
            ``"skew_forward_kl"`` KL(q ‖ αq + (1 − α)p) and ``"skew_reverse_kl"``
            KL(p ‖ (1 − α)q + αp) (DistiLLM, α = ``skew_alpha``).
        t2_scaling: multiply the divergence by T² (Hinton); ``kd_loss`` equals
            ``divergence="forward_kl", t2_scaling=True``. The default follows TRL and Liger.
        alpha: weight of the divergence; ``alpha < 1`` adds (1 − α)·CE on the transformed student
            logits at T = 1 and needs ``target``.
        num_items_in_batch: replaces the ``batchmean`` divisor (Hugging Face's gradient-accumulation
            count): a Python number or a 0-dim tensor.
        vocab_parallel_group, vocab_start_index: tensor parallelism. Both logit tensors are this
            rank's contiguous vocabulary shard ``[..., V_r]`` (rank order = shard order), starting at
            global column ``vocab_start_index`` (None: rank·V_r, equal shards); ``target`` holds
            global labels. DTensors sharded on the last dimension are accepted without these
            arguments. Every rank returns the full loss; the gradient is this rank's shard. See
            :mod:`kdfast.parallel.vocab` for the collectives.
    """
    _checks.tensor("student_logits", student_logits, min_ndim=1)  # the rest once local
    _check_distill_options(temperature, alpha, reduction, target)
    _checks.choice("divergence", divergence, _checks.DIVERGENCES)
    _checks.in_unit_interval("beta", beta)
    _checks.unit_interval_open_above("skew_alpha", skew_alpha)
    _checks.in_unit_interval("mixed_kl_weight", mixed_kl_weight)
    _checks.flag("t2_scaling", t2_scaling)
    _checks.num_items_in_batch(num_items_in_batch, reduction, student_logits.device)
    _checks.positive("student_logit_scale", student_logit_scale)
    _checks.positive("teacher_logit_scale", teacher_logit_scale)
    _checks.optional_positive("student_softcap", student_softcap)
    _checks.optional_positive("teacher_softcap", teacher_softcap)
    options = dict(divergence=divergence, beta=beta, skew_alpha=skew_alpha, mixed_kl_weight=mixed_kl_weight,
                   temperature=temperature, t2_scaling=t2_scaling, alpha=alpha, reduction=reduction,
                   num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                   student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                   teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
    if _is_vocab_parallel(student_logits, vocab_parallel_group, vocab_start_index):
        return _run_vocab_parallel("divergence_loss", student_logits, teacher_logits, target,
                                   vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index,
                                   backend=backend, **options)
    _check_logit_pair(student_logits, teacher_logits)
    flat_target = _check_row_target(target, student_logits, ignore_index, required=False)
    return _run_row_loss("divergence_loss", backend, student_logits, teacher_logits, flat_target, **options)


def _check_topk_options(*, divergence, beta, mixed_kl_weight, tail, temperature, teacher_temperature, t2_scaling,
                        alpha, reverse_kl_floor, reduction, num_items_in_batch, student_logit_scale, student_softcap,
                        target, device) -> None:
    """The option checks of the top-k losses (the plain and the fused-linear one)."""
    from .reference.topk import check_tail_options
    _check_distill_options(temperature, alpha, reduction, target)
    _checks.choice("divergence", divergence, _checks.TOPK_DIVERGENCES)
    _checks.choice("tail", tail, _checks.TOPK_TAILS)
    _checks.in_unit_interval("beta", beta)
    _checks.in_unit_interval("mixed_kl_weight", mixed_kl_weight)
    _checks.optional_positive("teacher_temperature", teacher_temperature)
    _checks.flag("t2_scaling", t2_scaling)
    _checks.optional_finite("reverse_kl_floor", reverse_kl_floor)
    _checks.num_items_in_batch(num_items_in_batch, reduction, device)
    _checks.positive("student_logit_scale", student_logit_scale)
    _checks.optional_positive("student_softcap", student_softcap)
    check_tail_options(divergence, tail, beta, mixed_kl_weight, temperature, teacher_temperature, reverse_kl_floor)


def _check_backend_name(backend) -> None:
    _checks.choice("backend", backend, ("auto", "reference", "cpu", "triton", "cuda"))


def topk_divergence_loss(student_logits: torch.Tensor, teacher_topk_indices: torch.Tensor,
                         teacher_topk_logprobs: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                         divergence: str = "forward_kl", beta: float = 0.5, mixed_kl_weight: float = 0.5,
                         tail: str = "renormalize", temperature: float = 1.0,
                         teacher_temperature: Optional[float] = None, t2_scaling: bool = False, alpha: float = 1.0,
                         reverse_kl_floor: Optional[float] = None, reduction: str = "batchmean",
                         num_items_in_batch=None, ignore_index: Optional[int] = -100,
                         student_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
                         vocab_parallel_group=None, vocab_start_index: Optional[int] = None,
                         backend: str = "auto") -> torch.Tensor:
    r"""Divergence between a sparse (top-k) teacher and the student's full distribution.

    The teacher of each row is given by k vocabulary indices and its log-probabilities ℓ there,
    computed over the whole vocabulary at ``teacher_temperature`` T_gen. K is the set of indices
    whose log-prob is > −inf (padding entries carry −inf; their index is ignored). With
    z' = c·tanh(s·z/c) (or s·z) the student's logits, p = softmax(z'/T) and

    .. math::
        \log \tilde q_i = \tfrac{T_{gen}}{T}\ell_i - \mathrm{LSE}_{j\in K}\big(\tfrac{T_{gen}}{T}\ell_j\big)

    the teacher re-tempered to T and renormalised over K, the per-row loss is
    ``α·(T² if t2_scaling)·D + (1 − α)·CE(z', y)`` with D, by ``tail``:

    * ``"renormalize"``: D(q̃ ‖ p) entry by entry over the vocabulary, q̃ = 0 outside K. Forward KL
      Σ_K q̃_i (log q̃_i − log p_i); the reverse KL uses ``reverse_kl_floor`` λ as the teacher's
      log-prob outside K: Σ_j p_j (log p_j − t_j), t = log q̃ on K, λ elsewhere (required for
      ``"reverse_kl"`` and ``"mixed_kl"``; −100 matches NeMo-RL).
    * ``"renormalize_both"``: D(q̃ ‖ p̃), p̃ = p renormalised over K (mass outside K is free).
    * ``"bucket"``: D over k + 1 bins, the tail bin holding the teacher's leftover mass
      Q_R = 1 − Σ_K e^{ℓ_i} and the student's Σ_{j∉K} p_j. Needs T_gen = T.
    * ``"truncate"``: Σ_K e^{ℓ_i}(ℓ_i − log p_i), not renormalised (can be negative); forward KL
      only; needs T_gen = T.

    Every gradient is the closed form ∂ℓ/∂z'_j = (p_j/T)(g_b(j) − ḡ) over the bins, written in the
    forward (dense over the vocabulary, except ``"renormalize_both"``, which is nonzero on K only).

    Args:
        student_logits: [..., V] student logits (receive the gradient).
        teacher_topk_indices: [..., k] integer vocabulary indices, distinct among the real entries.
        teacher_topk_logprobs: [..., k] teacher log-probabilities at those indices (−inf: padding).
        target: [...] labels, needed for ``alpha < 1`` or to skip rows with ``ignore_index``.
        divergence: ``"forward_kl"`` KL(q‖p), ``"reverse_kl"`` KL(p‖q), ``"mixed_kl"``
            (w·forward + (1 − w)·reverse, w = ``mixed_kl_weight``) or ``"jsd"`` (generalized JSD(β),
            β weights the teacher; β = 0 is the forward, β = 1 the reverse KL).
        tail: how the mass outside the teacher's top-k is treated (above).
        temperature: T. teacher_temperature: T_gen (None: equal to T).
        t2_scaling: multiply the divergence by T². alpha: weight of the divergence; ``alpha < 1``
            adds (1 − α)·CE on z' at T = 1.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"`` (÷ rows·V) | ``"batchmean"`` (÷ counted rows).
        num_items_in_batch: replaces the ``batchmean`` divisor (a number or a 0-dim tensor).
        student_logit_scale, student_softcap: s and c of the student's logit transform.
        vocab_parallel_group, vocab_start_index: tensor parallelism: ``student_logits`` is this
            rank's vocabulary shard (or a DTensor sharded on the last dimension); the teacher's
            indices (global) and log-probs are the same on every rank. See :mod:`kdfast.parallel.vocab`.
        backend: ``"reference"`` runs the plain reference (autograd); any other name (``"auto"``,
            ``"cpu"``, ``"triton"``, ``"cuda"``) runs the fused plain-PyTorch path of
            :mod:`kdfast.topk`, one code for every device.

    Shape:
        student_logits [..., V], teacher tensors [..., k], target [...]; the output is a scalar, or
        [...] with ``reduction="none"``.

    Examples::

        >>> z = torch.randn(4, 10, requires_grad=True)
        >>> idx = torch.stack([torch.randperm(10)[:3] for _ in range(4)])
        >>> logprobs = torch.log_softmax(torch.randn(4, 10), -1).gather(-1, idx)
        >>> loss = kdfast.topk_divergence_loss(z, idx, logprobs, tail="bucket")
        >>> loss.backward()
    """
    _checks.tensor("student_logits", student_logits, min_ndim=1)
    parallel = _is_vocab_parallel(student_logits, vocab_parallel_group, vocab_start_index)
    if parallel:  # this rank's shard, which may hold no column (V < P)
        from .parallel.vocab import local_logits
        student_logits, _, vocab_parallel_group, vocab_start_index = local_logits(
            student_logits, None, vocab_parallel_group, vocab_start_index)
    else:
        _check_logits("student_logits", student_logits)
    _checks.topk_teacher(teacher_topk_indices, teacher_topk_logprobs, batch_shape=student_logits.shape[:-1],
                         ref_name="student_logits", ref=student_logits,
                         num_classes=_checks.UNBOUNDED_CLASSES if parallel else student_logits.shape[-1])
    _check_topk_options(divergence=divergence, beta=beta, mixed_kl_weight=mixed_kl_weight, tail=tail,
                        temperature=temperature, teacher_temperature=teacher_temperature, t2_scaling=t2_scaling,
                        alpha=alpha, reverse_kl_floor=reverse_kl_floor, reduction=reduction,
                        num_items_in_batch=num_items_in_batch, student_logit_scale=student_logit_scale,
                        student_softcap=student_softcap, target=target, device=student_logits.device)
    _check_backend_name(backend)
    if parallel:
        from .parallel.vocab import vocab_parallel_loss
        if target is not None:
            _checks.target("target", target, batch_shape=student_logits.shape[:-1], ref_name="student_logits",
                           ref=student_logits, num_classes=_checks.UNBOUNDED_CLASSES, ignore_index=ignore_index)
        return vocab_parallel_loss(
            "topk_divergence_loss", student_logits, (teacher_topk_indices, teacher_topk_logprobs), target,
            group=vocab_parallel_group, vocab_start_index=vocab_start_index, divergence=divergence, beta=beta,
            mixed_kl_weight=mixed_kl_weight, tail=tail, temperature=temperature,
            teacher_temperature=teacher_temperature, t2_scaling=t2_scaling, alpha=alpha,
            reverse_kl_floor=reverse_kl_floor, reduction=reduction, num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index, student_logit_scale=student_logit_scale, student_softcap=student_softcap)
    flat_target = _check_row_target(target, student_logits, ignore_index, required=False)
    k = teacher_topk_indices.shape[-1]
    options = dict(divergence=divergence, beta=beta, mixed_kl_weight=mixed_kl_weight, tail=tail,
                   temperature=temperature, teacher_temperature=teacher_temperature, t2_scaling=t2_scaling,
                   alpha=alpha, reverse_kl_floor=reverse_kl_floor, reduction=reduction,
                   num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                   student_logit_scale=student_logit_scale, student_softcap=student_softcap)
    # No kernel backend implements this loss: "reference" is the autograd reference, every other
    # name the fused plain-PyTorch path (the same code on every device).
    if backend == "reference":
        op = resolve("reference", "topk_divergence_loss", student_logits.device)
    else:
        from .topk import topk_divergence_loss as op
    loss = op(_rows(student_logits), teacher_topk_indices.reshape(-1, k), teacher_topk_logprobs.reshape(-1, k),
              flat_target, **options)
    return _unflatten(loss, reduction, student_logits.shape[:-1])


def nd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, target: torch.Tensor,
            centers: torch.Tensor, *, reduction: str = "mean", ignore_index: Optional[int] = -100,
            eps: float = 1e-8, backend: str = "auto") -> torch.Tensor:
    """ND loss: 1 − ⟨u, ê_y⟩ / max(‖u‖, ‖f^t‖), averaged over the batch.

    ``student_features`` (B×d) must already be in the teacher's dimension d (see
    :class:`kdfast.NDLoss` for the projection); ``centers`` is the raw C×d teacher class-mean table.
    """
    _checks.tensor("student_features", student_features, ndim=2)
    _checks.tensor("teacher_features", teacher_features, ndim=2)
    _checks.tensor("centers", centers, ndim=2)
    _checks.same_shape("teacher_features", teacher_features, "student_features", student_features)
    _checks.same_dtype_device("teacher_features", teacher_features, "student_features", student_features)
    _checks.same_dtype_device("centers", centers, "student_features", student_features)
    if centers.shape[1] != student_features.shape[1]:
        raise ValueError(f"centers has feature dimension {centers.shape[1]} but student_features has "
                         f"{student_features.shape[1]}; project the student features to the teacher's dimension")
    if centers.shape[0] == 0:
        raise ValueError("centers must have at least one class (row)")
    _checks.choice("reduction", reduction, _checks.ND_REDUCTIONS)
    _checks.positive("eps", eps)
    _checks.ignore_index(ignore_index)
    _checks.target("target", target, batch_shape=student_features.shape[:1], ref_name="student_features",
                   ref=student_features, num_classes=centers.shape[0], ignore_index=ignore_index)
    op = resolve(backend, "nd_loss", student_features.device)
    return op(student_features, teacher_features, target, centers, reduction=reduction,
              ignore_index=ignore_index, eps=eps)


def nystrom_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                 student_landmarks: torch.Tensor, teacher_landmarks: torch.Tensor, *, kind: str = "smooth_l1",
                 normalize: bool = True, reduction: str = "sum", beta: float = 1.0, eps: float = 1e-12,
                 backend: str = "auto") -> torch.Tensor:
    """KDA / Nyström partial-Gram transfer: loss(F^s·C^sᵀ − F^t·C^tᵀ) / ‖F^t·C^tᵀ‖_F.

    Each network uses its own landmarks (e.g. its class means from the previous epoch), so the
    student and teacher feature dimensions may differ; both landmark tables must have m rows.
    """
    _checks.tensor("student_features", student_features, ndim=2)
    _checks.tensor("teacher_features", teacher_features, ndim=2)
    _checks.tensor("student_landmarks", student_landmarks, ndim=2)
    _checks.tensor("teacher_landmarks", teacher_landmarks, ndim=2)
    for name, value in (("teacher_features", teacher_features), ("student_landmarks", student_landmarks),
                        ("teacher_landmarks", teacher_landmarks)):
        _checks.same_dtype_device(name, value, "student_features", student_features)
    if teacher_features.shape[0] != student_features.shape[0]:
        raise ValueError(f"teacher_features has {teacher_features.shape[0]} rows but student_features has "
                         f"{student_features.shape[0]}; they must match")
    if student_landmarks.shape[1] != student_features.shape[1]:
        raise ValueError(f"student_landmarks has dimension {student_landmarks.shape[1]} but student_features "
                         f"has {student_features.shape[1]}")
    if teacher_landmarks.shape[1] != teacher_features.shape[1]:
        raise ValueError(f"teacher_landmarks has dimension {teacher_landmarks.shape[1]} but teacher_features "
                         f"has {teacher_features.shape[1]}")
    if student_landmarks.shape[0] != teacher_landmarks.shape[0]:
        raise ValueError(f"student_landmarks has {student_landmarks.shape[0]} landmarks but teacher_landmarks "
                         f"has {teacher_landmarks.shape[0]}; they must match")
    _checks.choice("kind", kind, _checks.NYSTROM_KINDS)
    _checks.choice("reduction", reduction, ("sum",) if kind == "fro" else _checks.ND_REDUCTIONS)
    _checks.positive("beta", beta)
    _checks.positive("eps", eps)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    op = resolve(backend, "nystrom_loss", student_features.device)
    return op(student_features, teacher_features, student_landmarks, teacher_landmarks, kind=kind,
              normalize=normalize, reduction=reduction, beta=beta, eps=eps)


def l2rkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mixed_student_logits: torch.Tensor,
               mixed_teacher_logits: torch.Tensor, target: Optional[torch.Tensor] = None, *,
               temperature: float = 4.0, kd_weight: float = 1.0, region_weight: float = 1.0,
               ce_weight: float = 1.0, reduction: str = "batchmean", ignore_index: Optional[int] = -100,
               backend: str = "auto") -> torch.Tensor:
    """L2RKD (spec §5a): CE(z^s(x), y)·ce_weight + kd_weight·T²·KL on the clean inputs
    + region_weight·T²·KL on the mixed inputs x̃ = λx + (1 − λ)x_π (see :func:`l2rkd_mix`),
    the teacher evaluated at x̃. The CE term needs ``target``; set ``ce_weight=0`` to leave it out."""
    for name in ("kd_weight", "region_weight", "ce_weight"):
        _checks.non_negative(name, locals()[name])
    if ce_weight > 0 and target is None:
        raise ValueError("target is required when ce_weight > 0")
    clean_kd = kd_loss(student_logits, teacher_logits, target, temperature=temperature, reduction=reduction,
                       ignore_index=ignore_index, backend=backend)
    region_kd = kd_loss(mixed_student_logits, mixed_teacher_logits, temperature=temperature,
                        reduction=reduction, backend=backend)
    loss = kd_weight * clean_kd + region_weight * region_kd
    if ce_weight > 0:
        # label smoothing with ε = 0 is plain CE (with CE's meaning of reduction="mean")
        loss = loss + ce_weight * label_smoothing_loss(student_logits, target, smoothing=0.0,
                                                       reduction=reduction, ignore_index=ignore_index,
                                                       backend=backend)
    return loss
