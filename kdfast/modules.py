"""nn.Module losses: the constructor takes the hyper-parameters, ``forward`` the tensors.

Each module calls its twin in :mod:`kdfast.functional`; the stateful ones (NDLoss, NystromLoss)
also own their centres or landmarks.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from . import _checks
from . import functional as KF
from . import fused_linear
from ._dispatch import BACKEND_MODULES
from .accumulators import ClassCenters
from .regions import l2rkd_mix

BACKEND_NAMES = ("auto", *BACKEND_MODULES)


def _check_accum_dtype(name, value):
    if value is not None and not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or None, got {type(value).__name__}")


#: hyper-parameter → its check (name, value); the choices of reduction and normalize depend on the
#: loss and are checked from each class's CHOICES
_HYPER_PARAMETER_CHECKS = {
    "temperature": _checks.positive,
    "alpha": _checks.in_unit_interval,
    "multiplier": _checks.optional_positive,
    "eps": _checks.positive,
    "beta": _checks.positive,
    "smoothing": _checks.in_unit_interval,
    "ignore_index": lambda name, value: _checks.ignore_index(value, name),
    "kd_weight": _checks.non_negative,
    "region_weight": _checks.non_negative,
    "ce_weight": _checks.non_negative,
    "mix_alpha": _checks.positive,
    "lam_min": lambda name, value: value is None or _checks.in_unit_interval(name, value),
    "chunk_size": lambda name, value: _checks.positive_int(name, value, optional=True),
    "accum_dtype": _check_accum_dtype,
    "backend": lambda name, value: _checks.choice(name, value, BACKEND_NAMES),
}


def check_hyper_parameters(choices: dict, checks: Optional[dict] = None, **options) -> None:
    """Check each hyper-parameter where it is given (the constructor), with the ops' rules:
    ``choices`` maps an option (reduction, normalize, kind) to its allowed values; ``checks``
    overrides :data:`_HYPER_PARAMETER_CHECKS` for a loss whose option means something else
    (``beta`` of DivergenceLoss is a weight in [0, 1], NystromLoss's is a positive threshold)."""
    checks = {**_HYPER_PARAMETER_CHECKS, **(checks or {})}
    for name, value in options.items():
        if name in choices:
            _checks.choice(name, value, choices[name])
        elif name in checks:
            checks[name](name, value)


class _HyperParameters(nn.Module):
    """Stores keyword hyper-parameters, checked once here, and shows them in repr()."""

    #: option → allowed values, for the options whose choices depend on the loss
    CHOICES: dict = {"reduction": _checks.ROW_REDUCTIONS}
    #: option → its check, where it differs from :data:`_HYPER_PARAMETER_CHECKS`
    CHECKS: dict = {}

    def __init__(self, **options):
        super().__init__()
        check_hyper_parameters(self.CHOICES, self.CHECKS, **options)
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class KDLoss(_HyperParameters):
    """Hinton KD. ``forward(student_logits, teacher_logits, target=None)``; see :func:`kdfast.kd_loss`."""

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, reduction: str = "batchmean",
                 ignore_index: Optional[int] = -100, vocab_parallel_group=None,
                 vocab_start_index: Optional[int] = None, backend: str = "auto"):
        super().__init__(temperature=temperature, alpha=alpha, reduction=reduction, ignore_index=ignore_index,
                         vocab_parallel_group=vocab_parallel_group,
                         vocab_start_index=vocab_start_index, backend=backend)

    def forward(self, student_logits, teacher_logits, target=None, num_items_in_batch=None):
        return KF.kd_loss(student_logits, teacher_logits, target, num_items_in_batch=num_items_in_batch,
                          **self.options)


class SKDLoss(_HyperParameters):
    """Spherical KD. ``forward(student_logits, teacher_logits, target=None)``; see :func:`kdfast.skd_loss`.
    ``multiplier=None``: κ = 2 for ``layernorm`` / ``l2``, κ = 1 for ``standardize``."""

    CHOICES = {"reduction": _checks.ROW_REDUCTIONS, "normalize": _checks.SKD_NORMALIZATIONS}

    def __init__(self, temperature: float = 4.0, multiplier: Optional[float] = None, alpha: float = 1.0,
                 eps: float = 1e-7, normalize: str = "layernorm", reduction: str = "batchmean",
                 ignore_index: Optional[int] = -100, vocab_parallel_group=None,
                 vocab_start_index: Optional[int] = None, backend: str = "auto"):
        super().__init__(temperature=temperature, multiplier=multiplier, alpha=alpha, eps=eps, normalize=normalize,
                         reduction=reduction, ignore_index=ignore_index, vocab_parallel_group=vocab_parallel_group,
                         vocab_start_index=vocab_start_index, backend=backend)

    def forward(self, student_logits, teacher_logits, target=None, num_items_in_batch=None):
        return KF.skd_loss(student_logits, teacher_logits, target, num_items_in_batch=num_items_in_batch,
                           **self.options)


class PartialTeacherLoss(_HyperParameters):
    """KD-pt. ``forward(student_logits, teacher_logits, target)``; see :func:`kdfast.partial_teacher_loss`."""

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, reduction: str = "batchmean",
                 ignore_index: Optional[int] = -100, backend: str = "auto"):
        super().__init__(temperature=temperature, alpha=alpha, reduction=reduction, ignore_index=ignore_index,
                         backend=backend)

    def forward(self, student_logits, teacher_logits, target, num_items_in_batch=None):
        return KF.partial_teacher_loss(student_logits, teacher_logits, target, num_items_in_batch=num_items_in_batch,
                                       **self.options)


class LabelSmoothingLoss(_HyperParameters):
    """``forward(student_logits, target)``; see :func:`kdfast.label_smoothing_loss`."""

    def __init__(self, smoothing: float = 0.1, reduction: str = "mean", ignore_index: Optional[int] = -100,
                 backend: str = "auto"):
        super().__init__(smoothing=smoothing, reduction=reduction, ignore_index=ignore_index, backend=backend)

    def forward(self, student_logits, target, num_items_in_batch=None):
        return KF.label_smoothing_loss(student_logits, target, num_items_in_batch=num_items_in_batch, **self.options)


class ReweightedCELoss(_HyperParameters):
    """``forward(student_logits, teacher_logits, target)``; see :func:`kdfast.reweighted_ce_loss`."""

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, eps: float = 1e-6, reduction: str = "mean",
                 ignore_index: Optional[int] = -100, backend: str = "auto"):
        super().__init__(alpha=alpha, temperature=temperature, eps=eps, reduction=reduction,
                         ignore_index=ignore_index, backend=backend)

    def forward(self, student_logits, teacher_logits, target, num_items_in_batch=None):
        return KF.reweighted_ce_loss(student_logits, teacher_logits, target, num_items_in_batch=num_items_in_batch,
                                     **self.options)


class DivergenceLoss(_HyperParameters):
    """LLM distillation divergences (forward / reverse / mixed KL, generalized JSD(β), TVD, skew
    KL). ``forward(student_logits, teacher_logits, target=None, num_items_in_batch=None)``; see
    :func:`kdfast.divergence_loss`. ``num_items_in_batch`` changes every optimizer step, so it is
    an argument of ``forward``, not of the constructor."""

    CHOICES = {"reduction": _checks.ROW_REDUCTIONS, "divergence": _checks.DIVERGENCES}
    CHECKS = {
        "beta": _checks.in_unit_interval,
        "skew_alpha": _checks.unit_interval_open_above,
        "mixed_kl_weight": _checks.in_unit_interval,
        "t2_scaling": _checks.flag,
        "student_logit_scale": _checks.positive,
        "teacher_logit_scale": _checks.positive,
        "student_softcap": _checks.optional_positive,
        "teacher_softcap": _checks.optional_positive,
    }

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5, skew_alpha: float = 0.1,
                 mixed_kl_weight: float = 0.5, temperature: float = 1.0, t2_scaling: bool = False,
                 alpha: float = 1.0, reduction: str = "batchmean", ignore_index: Optional[int] = -100,
                 student_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
                 teacher_logit_scale: float = 1.0, teacher_softcap: Optional[float] = None,
                 vocab_parallel_group=None,
                 vocab_start_index: Optional[int] = None, backend: str = "auto"):
        super().__init__(divergence=divergence, beta=beta, skew_alpha=skew_alpha, mixed_kl_weight=mixed_kl_weight,
                         temperature=temperature, t2_scaling=t2_scaling, alpha=alpha, reduction=reduction,
                         ignore_index=ignore_index, student_logit_scale=student_logit_scale,
                         student_softcap=student_softcap, teacher_logit_scale=teacher_logit_scale,
                         teacher_softcap=teacher_softcap, vocab_parallel_group=vocab_parallel_group,
                         vocab_start_index=vocab_start_index, backend=backend)

    def forward(self, student_logits, teacher_logits, target=None, num_items_in_batch=None):
        return KF.divergence_loss(student_logits, teacher_logits, target, num_items_in_batch=num_items_in_batch,
                                  **self.options)


class NDLoss(nn.Module):
    """ND loss against fixed teacher class centres.

    ``NDLoss(centers)`` takes the raw C×d teacher class-mean table (see :class:`ClassCenters` or
    :meth:`from_teacher`). When the student's feature dimension differs, pass ``student_dim``: a
    trainable projection BatchNorm1d → Dropout(0.5) → Linear(student_dim → d) is created, as in
    the ND paper's code; its parameters belong to this module, so give them to the optimiser.
    ``forward(student_features, teacher_features, target)``.
    """

    def __init__(self, centers: torch.Tensor, *, student_dim: Optional[int] = None, reduction: str = "mean",
                 ignore_index: Optional[int] = -100, eps: float = 1e-8, backend: str = "auto"):
        super().__init__()
        if not isinstance(centers, torch.Tensor) or centers.dim() != 2:
            raise ValueError("centers must be a 2-D tensor [num_classes, teacher_dim]")
        _checks.positive_int("student_dim", student_dim, optional=True)
        check_hyper_parameters({"reduction": _checks.ND_REDUCTIONS}, reduction=reduction, ignore_index=ignore_index,
                               eps=eps, backend=backend)
        self.register_buffer("centers", centers.detach().clone())
        teacher_dim = centers.shape[1]
        self.projector = None
        if student_dim is not None and student_dim != teacher_dim:
            self.projector = nn.Sequential(nn.BatchNorm1d(student_dim), nn.Dropout(0.5),
                                           nn.Linear(student_dim, teacher_dim))
        self.options = dict(reduction=reduction, ignore_index=ignore_index, eps=eps, backend=backend)

    @classmethod
    @torch.no_grad()
    def from_teacher(cls, teacher: nn.Module, loader: Iterable, num_classes: int, *,
                     feature_fn: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
                     device: Optional[torch.device] = None, progress: bool = True, **options) -> "NDLoss":
        """Compute the centres as the teacher's mean feature per class over ``loader`` (batches of
        ``(inputs, target)``), in eval mode, then build the loss. ``feature_fn(teacher, inputs)``
        returns the penultimate features (default: ``teacher(inputs)``). All-reduced under DDP."""
        from tqdm.auto import tqdm

        extract = feature_fn or (lambda model, inputs: model(inputs))
        was_training = teacher.training
        teacher.eval()
        accumulator = None
        try:
            for inputs, target in tqdm(loader, desc="teacher class centres", disable=not progress):
                if device is not None:
                    inputs, target = inputs.to(device), target.to(device)
                features = extract(teacher, inputs)
                if accumulator is None:
                    accumulator = ClassCenters(num_classes, features.shape[1], device=features.device,
                                               ignore_index=options.get("ignore_index", -100))
                accumulator.update(features, target)
        finally:
            teacher.train(was_training)
        if accumulator is None:
            raise ValueError("loader yielded no batch, so no class centre can be computed")
        return cls(accumulator.compute(), **options)

    def forward(self, student_features, teacher_features, target):
        if self.projector is not None:
            student_features = self.projector(student_features)
        centers = self.centers.to(student_features.dtype)
        return KF.nd_loss(student_features, teacher_features, target, centers, **self.options)

    def extra_repr(self) -> str:
        return f"num_classes={self.centers.shape[0]}, dim={self.centers.shape[1]}, " + \
            ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class NystromLoss(nn.Module):
    """KDA / Nyström kernel transfer with per-epoch class-mean landmarks (spec §3a).

    During an epoch, ``forward(student_features, teacher_features, target)`` returns the loss
    against the landmarks of the previous epoch and, in training mode, adds the (detached)
    features of both networks to this epoch's class-mean accumulators. Call ``end_epoch()`` after
    each epoch to turn the accumulated means into the next landmarks (all-reduced under DDP;
    classes with no sample get a zero landmark).

    Warm-up: before the first ``end_epoch()`` the landmarks are zero, and so are the loss and its
    gradient. The released KDA code instead leaves its term out for ``warm`` epochs (5 by default)
    while the centres are accumulated: this module equals it for ``warm = 1`` only. For a longer
    warm-up, keep calling the module in training mode (so that the centres accumulate) and leave
    its loss out of the total for the first ``warm`` epochs (counted from 0), as the released code
    does::

        kda_term = kda(student_features, teacher_features, target)   # also accumulates the class means
        loss = ce + (alpha * kda_term if epoch >= warm else 0.0)
    """

    def __init__(self, num_classes: int, student_dim: int, teacher_dim: int, *, kind: str = "smooth_l1",
                 normalize: bool = True, reduction: str = "sum", beta: float = 1.0, eps: float = 1e-12,
                 ignore_index: Optional[int] = -100, backend: str = "auto", process_group=None):
        super().__init__()
        _checks.flag("normalize", normalize)
        check_hyper_parameters({"kind": _checks.NYSTROM_KINDS,
                                "reduction": ("sum",) if kind == "fro" else _checks.ND_REDUCTIONS},
                               kind=kind, beta=beta, eps=eps, ignore_index=ignore_index, backend=backend,
                               reduction=reduction)
        self.student_centers = ClassCenters(num_classes, student_dim, ignore_index=ignore_index,
                                            process_group=process_group)
        self.teacher_centers = ClassCenters(num_classes, teacher_dim, ignore_index=ignore_index,
                                            process_group=process_group)
        self.register_buffer("student_landmarks", torch.zeros(num_classes, student_dim))
        self.register_buffer("teacher_landmarks", torch.zeros(num_classes, teacher_dim))
        self.options = dict(kind=kind, normalize=normalize, reduction=reduction, beta=beta, eps=eps, backend=backend)

    def forward(self, student_features, teacher_features, target):
        if self.training:
            self.student_centers.update(student_features, target)
            self.teacher_centers.update(teacher_features, target)
        dtype = student_features.dtype
        return KF.nystrom_loss(student_features, teacher_features, self.student_landmarks.to(dtype),
                               self.teacher_landmarks.to(dtype), **self.options)

    @torch.no_grad()
    def end_epoch(self) -> None:
        self.student_landmarks.copy_(self.student_centers.compute(empty="zero"))
        self.teacher_landmarks.copy_(self.teacher_centers.compute(empty="zero"))
        self.student_centers.reset()
        self.teacher_centers.reset()


class L2RKDLoss(_HyperParameters):
    """L2RKD: KD on clean inputs and on points of locally linear regions between inputs.

    >>> criterion = L2RKDLoss(temperature=4.0)
    >>> mixed, _, _ = criterion.mix(images)               # x̃ = λx + (1 − λ)x_π
    >>> loss = criterion(student(images), teacher(images), student(mixed), teacher(mixed), labels)

    ``mix`` draws λ ~ Beta(mix_alpha, mix_alpha) (or U[lam_min, 1]) with this module's
    ``generator``; see :func:`kdfast.l2rkd_mix` and :func:`kdfast.functional.l2rkd_loss`.
    """

    def __init__(self, temperature: float = 4.0, kd_weight: float = 1.0, region_weight: float = 1.0,
                 ce_weight: float = 1.0, mix_alpha: float = 1.0, lam_min: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: Optional[int] = -100, backend: str = "auto",
                 generator: Optional[torch.Generator] = None):
        check_hyper_parameters({}, mix_alpha=mix_alpha, lam_min=lam_min)
        super().__init__(temperature=temperature, kd_weight=kd_weight, region_weight=region_weight,
                         ce_weight=ce_weight, reduction=reduction, ignore_index=ignore_index, backend=backend)
        self.mix_options = dict(alpha=mix_alpha, lam_min=lam_min)
        self.generator = generator

    def mix(self, inputs: torch.Tensor):
        return l2rkd_mix(inputs, generator=self.generator, **self.mix_options)

    def forward(self, student_logits, teacher_logits, mixed_student_logits, mixed_teacher_logits, target=None):
        return KF.l2rkd_loss(student_logits, teacher_logits, mixed_student_logits, mixed_teacher_logits, target,
                             **self.options)


class FusedLinearKDLoss(_HyperParameters):
    """KD on output projections without materialising the logits (see
    :func:`kdfast.fused_linear_kd_loss`). ``forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight, target=None, student_bias=None, teacher_bias=None, num_items_in_batch=None)``. DTensor
    (FSDP2) lm-head weights are gathered once per call; ``vocab_parallel_group`` takes vocabulary shards."""

    _function = staticmethod(fused_linear.fused_linear_kd_loss)
    CHOICES = {"reduction": fused_linear.REDUCTIONS, "normalize": _checks.SKD_NORMALIZATIONS}

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, ignore_index: Optional[int] = -100,
                 reduction: str = "batchmean", chunk_size: Optional[int] = None,
                 accum_dtype: Optional[torch.dtype] = torch.float32, vocab_parallel_group=None,
                 vocab_start_index: Optional[int] = None, backend: str = "auto"):
        super().__init__(temperature=temperature, alpha=alpha, ignore_index=ignore_index, reduction=reduction,
                         chunk_size=chunk_size, accum_dtype=accum_dtype, vocab_parallel_group=vocab_parallel_group,
                         vocab_start_index=vocab_start_index, backend=backend)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, target=None,
                student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return self._function(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                              student_bias=student_bias, teacher_bias=teacher_bias,
                              num_items_in_batch=num_items_in_batch, **self.options)


class FusedLinearSKDLoss(FusedLinearKDLoss):
    """Spherical KD on output projections (see :func:`kdfast.fused_linear_skd_loss`)."""

    _function = staticmethod(fused_linear.fused_linear_skd_loss)

    def __init__(self, temperature: float = 4.0, multiplier: Optional[float] = None, alpha: float = 1.0,
                 eps: float = 1e-7, normalize: str = "layernorm", ignore_index: Optional[int] = -100,
                 reduction: str = "batchmean", chunk_size: Optional[int] = None,
                 accum_dtype: Optional[torch.dtype] = torch.float32, vocab_parallel_group=None,
                 vocab_start_index: Optional[int] = None, backend: str = "auto"):
        _HyperParameters.__init__(self, temperature=temperature, multiplier=multiplier, alpha=alpha, eps=eps,
                                  normalize=normalize, ignore_index=ignore_index, reduction=reduction,
                                  chunk_size=chunk_size, accum_dtype=accum_dtype, vocab_parallel_group=vocab_parallel_group,
                         vocab_start_index=vocab_start_index, backend=backend)


class FusedLinearDivergenceLoss(FusedLinearKDLoss):
    """LLM divergences on output projections without materialising the logits (see
    :func:`kdfast.fused_linear_divergence_loss`). ``forward(student_hidden, student_weight,
    teacher_hidden, teacher_weight, target=None, student_bias=None, teacher_bias=None,
    num_items_in_batch=None)``."""

    _function = staticmethod(fused_linear.fused_linear_divergence_loss)
    CHOICES = {"reduction": fused_linear.REDUCTIONS, "divergence": _checks.DIVERGENCES}
    CHECKS = DivergenceLoss.CHECKS

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5, skew_alpha: float = 0.1,
                 mixed_kl_weight: float = 0.5, temperature: float = 1.0, t2_scaling: bool = False,
                 alpha: float = 1.0, reduction: str = "batchmean", ignore_index: Optional[int] = -100,
                 student_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
                 teacher_logit_scale: float = 1.0, teacher_softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None, accum_dtype: Optional[torch.dtype] = torch.float32,
                 vocab_parallel_group=None,
                 vocab_start_index: Optional[int] = None, backend: str = "auto"):
        _HyperParameters.__init__(self, divergence=divergence, beta=beta, skew_alpha=skew_alpha,
                                  mixed_kl_weight=mixed_kl_weight, temperature=temperature, t2_scaling=t2_scaling,
                                  alpha=alpha, reduction=reduction, ignore_index=ignore_index,
                                  student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                                  teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap,
                                  chunk_size=chunk_size, accum_dtype=accum_dtype, vocab_parallel_group=vocab_parallel_group,
                         vocab_start_index=vocab_start_index, backend=backend)


_TOPK_CHECKS = {
    "beta": _checks.in_unit_interval,
    "mixed_kl_weight": _checks.in_unit_interval,
    "teacher_temperature": _checks.optional_positive,
    "t2_scaling": _checks.flag,
    "reverse_kl_floor": _checks.optional_finite,
    "student_logit_scale": _checks.positive,
    "student_softcap": _checks.optional_positive,
}


class TopKDivergenceLoss(_HyperParameters):
    """Divergences against a sparse (top-k) teacher. ``forward(student_logits, teacher_topk_indices,
    teacher_topk_logprobs, target=None, num_items_in_batch=None)``; see
    :func:`kdfast.topk_divergence_loss` (the formulas, the ``tail`` modes, the shapes).

    Examples::

        >>> loss_fn = kdfast.TopKDivergenceLoss(divergence="jsd", beta=0.5, tail="bucket")
        >>> loss = loss_fn(student_logits, teacher_topk_indices, teacher_topk_logprobs)
    """

    CHOICES = {"reduction": _checks.ROW_REDUCTIONS, "divergence": _checks.TOPK_DIVERGENCES,
               "tail": _checks.TOPK_TAILS}
    CHECKS = _TOPK_CHECKS

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5, mixed_kl_weight: float = 0.5,
                 tail: str = "renormalize", temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 t2_scaling: bool = False, alpha: float = 1.0, reverse_kl_floor: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: Optional[int] = -100, student_logit_scale: float = 1.0,
                 student_softcap: Optional[float] = None, vocab_parallel_group=None,
                 vocab_start_index: Optional[int] = None, backend: str = "auto"):
        super().__init__(divergence=divergence, beta=beta, mixed_kl_weight=mixed_kl_weight, tail=tail,
                         temperature=temperature, teacher_temperature=teacher_temperature, t2_scaling=t2_scaling,
                         alpha=alpha, reverse_kl_floor=reverse_kl_floor, reduction=reduction,
                         ignore_index=ignore_index, student_logit_scale=student_logit_scale,
                         student_softcap=student_softcap, vocab_parallel_group=vocab_parallel_group,
                         vocab_start_index=vocab_start_index, backend=backend)
        from .reference.topk import check_tail_options
        check_tail_options(divergence, tail, beta, mixed_kl_weight, temperature, teacher_temperature,
                           reverse_kl_floor)

    def forward(self, student_logits, teacher_topk_indices, teacher_topk_logprobs, target=None,
                num_items_in_batch=None):
        return KF.topk_divergence_loss(student_logits, teacher_topk_indices, teacher_topk_logprobs, target,
                                       num_items_in_batch=num_items_in_batch, **self.options)


class FusedLinearTopKDivergenceLoss(_HyperParameters):
    """Top-k teacher divergences on the student's output projection, without materialising the
    logits (see :func:`kdfast.fused_linear_topk_divergence_loss`). ``forward(student_hidden,
    student_weight, teacher_topk_indices, teacher_topk_logprobs, target=None, student_bias=None,
    num_items_in_batch=None)``. A DTensor (FSDP2) lm-head weight is gathered once per call;
    ``vocab_parallel_group`` takes vocabulary shards.

    Examples::

        >>> loss_fn = kdfast.FusedLinearTopKDivergenceLoss(tail="bucket")
        >>> loss = loss_fn(hidden, lm_head.weight, teacher_topk_indices, teacher_topk_logprobs)
    """

    CHOICES = {"reduction": fused_linear.REDUCTIONS, "divergence": _checks.TOPK_DIVERGENCES,
               "tail": _checks.TOPK_TAILS}
    CHECKS = _TOPK_CHECKS

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5, mixed_kl_weight: float = 0.5,
                 tail: str = "renormalize", temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 t2_scaling: bool = False, alpha: float = 1.0, reverse_kl_floor: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: Optional[int] = -100, student_logit_scale: float = 1.0,
                 student_softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 accum_dtype: Optional[torch.dtype] = torch.float32, vocab_parallel_group=None,
                 vocab_start_index: Optional[int] = None, backend: str = "auto"):
        super().__init__(divergence=divergence, beta=beta, mixed_kl_weight=mixed_kl_weight, tail=tail,
                         temperature=temperature, teacher_temperature=teacher_temperature, t2_scaling=t2_scaling,
                         alpha=alpha, reverse_kl_floor=reverse_kl_floor, reduction=reduction,
                         ignore_index=ignore_index, student_logit_scale=student_logit_scale,
                         student_softcap=student_softcap, chunk_size=chunk_size, accum_dtype=accum_dtype,
                         vocab_parallel_group=vocab_parallel_group,
                         vocab_start_index=vocab_start_index, backend=backend)
        from .reference.topk import check_tail_options
        check_tail_options(divergence, tail, beta, mixed_kl_weight, temperature, teacher_temperature,
                           reverse_kl_floor)

    def forward(self, student_hidden, student_weight, teacher_topk_indices, teacher_topk_logprobs, target=None,
                student_bias=None, num_items_in_batch=None):
        from .fused_linear_topk import fused_linear_topk_divergence_loss
        return fused_linear_topk_divergence_loss(student_hidden, student_weight, teacher_topk_indices,
                                                 teacher_topk_logprobs, target, student_bias=student_bias,
                                                 num_items_in_batch=num_items_in_batch, **self.options)
