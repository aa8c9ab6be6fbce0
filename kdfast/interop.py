"""Thin adapters so kdfast losses plug into other distillation frameworks' calling conventions.

Neither framework is imported: the adapters only follow their conventions.

* **torchdistill-style criteria** are called as ``criterion(student_io_dict, teacher_io_dict,
  targets)``, where an io dict maps a module path (``"fc"``, ``"layer4"``, …) to what a forward hook
  recorded, e.g. ``{"output": tensor}``. :class:`IODictLoss` picks the tensors out of the dicts
  and calls one kdfast loss; :class:`WeightedSumIOLoss` adds several such terms.
* **mdistiller-style distillers** are ``nn.Module`` s with ``forward_train(image, target, **kw)``
  returning ``(student_logits, {"loss_ce": ..., "loss_kd": ...})`` and ``forward_test(image)``;
  :class:`KDFastDistiller` wraps a student, a frozen teacher and a kdfast loss that way.

Which tensors a kdfast loss takes is known per loss type (:func:`call_loss`): logit losses get
``(student_logits, teacher_logits, target)``, :class:`~kdfast.LabelSmoothingLoss` only
``(student_logits, target)``, ND and Nyström take features, and :class:`~kdfast.L2RKDLoss`
also needs the outputs on mixed inputs (the distiller computes them; an io-dict criterion is
given them as extra io-dict entries).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import modules as M

# Losses that take (student, target) only.
_STUDENT_ONLY = (M.LabelSmoothingLoss,)


def call_loss(loss: Callable, student: torch.Tensor, teacher: Optional[torch.Tensor],
              target: Optional[torch.Tensor], mixed: Optional[tuple] = None) -> torch.Tensor:
    """Call a kdfast loss with the arguments its type takes.

    ``mixed = (student_on_mixed, teacher_on_mixed)`` is required by :class:`~kdfast.L2RKDLoss`
    and rejected elsewhere. Any other callable gets ``(student, teacher, target)``.
    """
    if isinstance(loss, M.L2RKDLoss):
        if mixed is None:
            raise ValueError("L2RKDLoss needs the student's and teacher's outputs on the mixed inputs")
        return loss(student, teacher, mixed[0], mixed[1], target)
    if mixed is not None:
        raise ValueError(f"{type(loss).__name__} takes no mixed-input outputs")
    if isinstance(loss, _STUDENT_ONLY):
        return loss(student, target)
    return loss(student, teacher, target)


def _lookup(io_dict: Mapping, module_path: str, key: str, side: str) -> torch.Tensor:
    try:
        entry = io_dict[module_path]
    except KeyError:
        raise KeyError(f"{side} io dict has no module path {module_path!r}; it has {sorted(io_dict)}") from None
    if isinstance(entry, torch.Tensor):  # some pipelines store the tensor itself
        return entry
    try:
        return entry[key]
    except KeyError:
        raise KeyError(f"{side} io dict entry {module_path!r} has no key {key!r}; it has {sorted(entry)}") from None


class IODictLoss(nn.Module):
    """A kdfast loss as a torchdistill-style criterion: ``forward(student_io_dict, teacher_io_dict, targets)``.

    >>> criterion = IODictLoss(kdfast.KDLoss(temperature=4.0, alpha=0.9), "fc")        # logits at "fc"
    >>> nd = IODictLoss(kdfast.NDLoss(centres), "avgpool", "avgpool", flatten=True)     # features
    >>> loss = criterion(student_io_dict, teacher_io_dict, targets)

    ``student_module`` / ``teacher_module`` name the io-dict entries (the teacher's defaults to the
    student's), ``student_key`` / ``teacher_key`` the field in them (``"output"`` by default).
    ``flatten=True`` flattens features to ``[batch, -1]`` (e.g. pooled ``[B, C, 1, 1]`` maps).
    For :class:`~kdfast.L2RKDLoss`, ``mixed_student_module`` / ``mixed_teacher_module`` name the
    entries holding the outputs on the mixed inputs. Parameters of ``loss`` (e.g. the ND projector)
    are this module's, so an optimiser over the criterion's parameters trains them.
    """

    def __init__(self, loss: nn.Module, student_module: str, teacher_module: Optional[str] = None, *,
                 student_key: str = "output", teacher_key: Optional[str] = None, weight: float = 1.0,
                 use_target: bool = True, flatten: bool = False, mixed_student_module: Optional[str] = None,
                 mixed_teacher_module: Optional[str] = None):
        super().__init__()
        self.loss = loss
        self.student_module, self.teacher_module = student_module, teacher_module or student_module
        self.student_key, self.teacher_key = student_key, teacher_key or student_key
        self.weight, self.use_target, self.flatten = weight, use_target, flatten
        self.mixed_modules = (mixed_student_module, mixed_teacher_module or mixed_student_module)
        if isinstance(loss, M.L2RKDLoss) and mixed_student_module is None:
            raise ValueError("L2RKDLoss needs mixed_student_module (the io-dict entry of the outputs on mixed inputs)")

    def _get(self, io_dict, module_path, key, side):
        value = _lookup(io_dict, module_path, key, side)
        return value.flatten(1) if self.flatten else value

    def forward(self, student_io_dict: Mapping, teacher_io_dict: Mapping, targets=None, *args, **kwargs):
        student = self._get(student_io_dict, self.student_module, self.student_key, "student")
        teacher = self._get(teacher_io_dict, self.teacher_module, self.teacher_key, "teacher").detach()
        mixed = None
        if self.mixed_modules[0] is not None:
            mixed = (self._get(student_io_dict, self.mixed_modules[0], self.student_key, "student"),
                     self._get(teacher_io_dict, self.mixed_modules[1], self.teacher_key, "teacher").detach())
        return self.weight * call_loss(self.loss, student, teacher, targets if self.use_target else None, mixed)

    def extra_repr(self) -> str:
        return (f"student={self.student_module!r}:{self.student_key!r}, teacher={self.teacher_module!r}:"
                f"{self.teacher_key!r}, weight={self.weight}")


class WeightedSumIOLoss(nn.Module):
    """Sum of named io-dict criteria (e.g. CE + KD + ND, as KD++): ``forward(student_io_dict,
    teacher_io_dict, targets)``. ``last_terms`` keeps the detached terms of the last call, for logging."""

    def __init__(self, terms: Mapping[str, nn.Module]):
        super().__init__()
        if not terms:
            raise ValueError("terms must name at least one criterion")
        self.terms = nn.ModuleDict(dict(terms))
        self.last_terms: dict = {}

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        values = {name: term(student_io_dict, teacher_io_dict, targets, *args, **kwargs)
                  for name, term in self.terms.items()}
        self.last_terms = {name: value.detach() for name, value in values.items()}
        return sum(values.values())


class CrossEntropyIOLoss(nn.Module):
    """Plain CE on the student's io-dict output, for :class:`WeightedSumIOLoss` recipes."""

    def __init__(self, student_module: str, *, student_key: str = "output", weight: float = 1.0, **ce_options):
        super().__init__()
        self.student_module, self.student_key, self.weight = student_module, student_key, weight
        self.ce_options = ce_options

    def forward(self, student_io_dict, teacher_io_dict, targets, *args, **kwargs):
        logits = _lookup(student_io_dict, self.student_module, self.student_key, "student")
        return self.weight * F.cross_entropy(logits, targets, **self.ce_options)


# ------------------------------------------------------------------------------------ mdistiller
def _split_output(output) -> tuple[torch.Tensor, dict]:
    """mdistiller models return ``(logits, {"pooled_feat": ..., "feats": [...]})``; plain models
    return the logits. Either way: (logits, feature dict)."""
    if isinstance(output, (tuple, list)):
        logits, feats = output[0], (output[1] if len(output) > 1 else {})
        return logits, feats if isinstance(feats, Mapping) else {"feats": feats}
    return output, {}


class KDFastDistiller(nn.Module):
    """An mdistiller-style distiller around any kdfast loss.

    >>> distiller = KDFastDistiller(student, teacher, kdfast.KDLoss(temperature=4.0), ce_weight=1.0, loss_weight=1.0)
    >>> logits, losses = distiller(image=x, target=y)        # training mode: forward_train
    >>> sum(losses.values()).backward()
    >>> logits = distiller(image=x)                          # eval mode: forward_test

    ``forward_train(image, target, **kwargs)`` returns ``(student_logits, {"loss_ce": ...,
    loss_name: ...})``: ``ce_weight``·CE(student logits, target) (left out when ``ce_weight`` is 0)
    and ``loss_weight``·the kdfast loss. ``inputs="logits"`` feeds the loss the logits;
    ``inputs="features"`` feeds it ``feature_fn(model, output)``, by default the ``feature_key``
    entry (``"pooled_feat"``) of the models' feature dicts, as mdistiller's models return them.
    An :class:`~kdfast.L2RKDLoss` mixes the batch with its own ``mix`` and runs both networks on
    the mixed images. Stateful losses (NystromLoss) still need their ``end_epoch()`` from the
    training loop. The teacher stays in eval mode and gets no gradient; ``get_learnable_parameters``
    returns the student's parameters and the loss's (e.g. the ND projector).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: nn.Module, *, ce_weight: float = 1.0,
                 loss_weight: float = 1.0, loss_name: str = "loss_kd", inputs: str = "logits",
                 feature_key: str = "pooled_feat",
                 feature_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None,
                 warmup_epochs: Union[int, float] = 0):
        super().__init__()
        if inputs not in ("logits", "features"):
            raise ValueError(f"inputs must be 'logits' or 'features', got {inputs!r}")
        if loss_name == "loss_ce":
            raise ValueError("loss_name 'loss_ce' is taken by the CE term")
        self.student, self.teacher, self.loss = student, teacher, loss
        self.ce_weight, self.loss_weight, self.loss_name = ce_weight, loss_weight, loss_name
        self.inputs, self.feature_key, self.feature_fn = inputs, feature_key, feature_fn
        self.warmup_epochs = warmup_epochs
        self.teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        # the teacher is frozen: never let .train() switch on its dropout / batch-norm updates
        super().train(mode)
        self.teacher.eval()
        return self

    def get_learnable_parameters(self) -> list:
        return list(self.student.parameters()) + [p for p in self.loss.parameters() if p.requires_grad]

    def get_extra_parameters(self) -> int:
        """Trainable parameters that are not the student's (mdistiller prints this)."""
        return sum(p.numel() for p in self.loss.parameters() if p.requires_grad)

    def _loss_inputs(self, model, output):
        logits, feats = _split_output(output)
        if self.inputs == "logits":
            return logits
        if self.feature_fn is not None:
            return self.feature_fn(model, output)
        if self.feature_key not in feats:
            raise KeyError(f"the model's feature dict has no {self.feature_key!r} (it has {sorted(feats)}); "
                           "pass feature_key= or feature_fn=")
        return feats[self.feature_key].flatten(1)

    def forward_train(self, image, target, **kwargs):
        s_out = self.student(image)
        logits, _ = _split_output(s_out)
        with torch.no_grad():
            t_out = self.teacher(image)
        mixed = None
        if isinstance(self.loss, M.L2RKDLoss):
            mixed_image, _, _ = self.loss.mix(image)
            with torch.no_grad():
                t_mixed = self._loss_inputs(self.teacher, self.teacher(mixed_image))
            mixed = (self._loss_inputs(self.student, self.student(mixed_image)), t_mixed)
        weight = self.loss_weight
        if self.warmup_epochs and "epoch" in kwargs:  # mdistiller passes epoch= to forward_train
            weight = weight * min(kwargs["epoch"] / self.warmup_epochs, 1.0)
        losses = {}
        if self.ce_weight:
            losses["loss_ce"] = self.ce_weight * F.cross_entropy(logits, target)
        losses[self.loss_name] = weight * call_loss(self.loss, self._loss_inputs(self.student, s_out),
                                                    self._loss_inputs(self.teacher, t_out).detach(), target, mixed)
        return logits, losses

    def forward_test(self, image):
        return _split_output(self.student(image))[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])


__all__: Sequence[str] = ("call_loss", "IODictLoss", "WeightedSumIOLoss", "CrossEntropyIOLoss", "KDFastDistiller")
