"""kdfast's fused-linear generalized JSD in place of TRL's own distillation loss.

:func:`with_kdfast_loss` takes TRL's ``DistillationTrainer`` or ``GKDTrainer`` (or a subclass of
either) and returns a subclass whose loss is :func:`kdfast.fused_linear_divergence_loss` with
``divergence="jsd"``, with ``beta`` and ``temperature`` meaning what they mean in that trainer:

* ``beta``: the generalized JSD's β (the teacher's weight in the mixture; 0 = forward KL(teacher ‖
  student), 1 = reverse KL), read from the trainer's config (``args.beta``).
* ``temperature``: ``DistillationTrainer`` divides both models' logits by ``args.temperature`` in
  its loss (and samples at it); ``GKDTrainer`` samples at ``args.temperature`` but computes its loss
  at T = 1 (its ``compute_loss`` calls ``generalized_jsd_loss`` without a temperature), and so does
  the subclass.

Everything else (generation, data handling, ``num_items_in_batch``, logging) stays TRL's. The
student's and the teacher's logits are never materialised (``GKDTrainer`` builds both in full);
logit scale and final softcap are applied per model as the trainers do. ``DistillationTrainer``'s
``entropy`` metric is not computed (kdfast's loss does not return the student's entropy): it is
logged as missing.

This module imports ``transformers``; TRL itself is only imported by the trainer class you pass.
"""
from __future__ import annotations

from typing import Optional

import torch

from .transformers import _distill, _unwrap, shifted_labels

__all__ = ["with_kdfast_loss"]

#: the multimodal inputs DistillationTrainer hands to both backbones
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _trl_base(trainer_class: type) -> Optional[str]:
    """``"DistillationTrainer"`` or ``"GKDTrainer"``: the TRL trainer ``trainer_class`` derives from
    (found by name and module, so that TRL's experimental modules are not imported here)."""
    for klass in trainer_class.__mro__:
        if klass.__module__.startswith("trl.") and klass.__name__ in ("DistillationTrainer", "GKDTrainer"):
            return klass.__name__
    return None


def with_kdfast_loss(trainer_class: type, *, chunk_size: Optional[int] = None, backend: str = "auto") -> type:
    """A subclass of TRL's ``trainer_class`` (``trl.DistillationTrainer``,
    ``trl.experimental.gkd.GKDTrainer`` or a subclass of either) whose distillation loss is
    kdfast's fused-linear generalized JSD, with the trainer's own ``beta`` and ``temperature``.

    Args:
        trainer_class: the TRL trainer class.
        chunk_size: rows per chunk of the fused loss (default: kdfast's rule).
        backend: kdfast backend (``"auto"``; ``"reference"`` materialises the logits).

    Returns:
        A class with the same constructor; build and ``train()`` it as the original.

    Raises:
        TypeError: ``trainer_class`` is neither of TRL's distillation trainers.

    Examples::

        >>> from trl import DistillationConfig, DistillationTrainer
        >>> Trainer = with_kdfast_loss(DistillationTrainer)
        >>> trainer = Trainer(model=student, teacher_model=teacher, args=DistillationConfig(beta=0.5),
        ...                   train_dataset=prompts, processing_class=tokenizer)
    """
    base = _trl_base(trainer_class) if isinstance(trainer_class, type) else None
    if base is None:
        raise TypeError(f"trainer_class must be TRL's DistillationTrainer or GKDTrainer (or a subclass), got "
                        f"{trainer_class!r}")
    options = dict(chunk_size=chunk_size, backend=backend)
    body = _gkd_methods(options) if base == "GKDTrainer" else _distillation_methods(options)
    body["__doc__"] = (f"TRL's {trainer_class.__name__} with kdfast's fused-linear generalized JSD as its loss "
                       f"(see kdfast.integrations.trl.with_kdfast_loss).")
    body["__module__"] = __name__
    return type(f"KDFast{trainer_class.__name__}", (trainer_class,), body)


def _gkd_methods(options: dict) -> dict:
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # GKDTrainer.compute_loss: student and teacher logits on input_ids, shifted by one, JSD(β) at
        # T = 1 over the positions whose label is not -100, / num_items_in_batch when given.
        from transformers.modeling_outputs import CausalLMOutputWithPast

        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                 "labels": inputs["labels"]}
        loss = _distill(student, teacher, batch, shifted_labels(batch), student_wrapper=model,
                        teacher_wrapper=self.teacher_model, divergence="jsd", beta=self.beta, temperature=1.0,
                        num_items_in_batch=num_items_in_batch, **options)
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

    return {"compute_loss": compute_loss}


def _distillation_methods(options: dict) -> dict:
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # DistillationTrainer._compute_loss: the completion positions of prompt + completion, JSD(β)
        # at self.temperature, masked by completion_mask (× tool_mask); returns (loss, entropy sum,
        # valid count). It already runs inside the student wrapper's forward.
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        batch = {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
                 "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)}
        batch.update({k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs})
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        # Position i predicts token i + 1: the completion is predicted from positions
        # [prompt_len - 1, seq_len - 1); only those rows are projected.
        prompt_length, length = prompt_ids.shape[1], batch["input_ids"].shape[1]
        target = completion_ids.masked_fill(loss_mask == 0, -100)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        loss = _distill(_unwrap(unwrapped_student), teacher, batch, target,
                        positions=slice(prompt_length - 1, length - 1), teacher_wrapper=self.teacher_model,
                        divergence="jsd", beta=self.beta, temperature=self.temperature,
                        num_items_in_batch=num_items_in_batch, **options)
        valid = (loss_mask != 0).sum()
        return loss, torch.full((), float("nan"), device=loss.device), valid

    return {"_compute_loss": _compute_loss}
