"""Integrations of kdfast's losses with training frameworks.

Each submodule imports its framework when it is imported, and only then, so that ``import kdfast``
never needs them:

* :mod:`kdfast.integrations.transformers` -- distil a Hugging Face causal LM without materialising
  either model's logits: :func:`~kdfast.integrations.transformers.causal_lm_distillation_loss` and
  the :class:`~kdfast.integrations.transformers.KDTrainer` (a ``transformers.Trainer``).
* :mod:`kdfast.integrations.trl` -- :func:`~kdfast.integrations.trl.with_kdfast_loss`, which makes
  TRL's ``DistillationTrainer`` / ``GKDTrainer`` compute their generalized JSD with kdfast.
"""
