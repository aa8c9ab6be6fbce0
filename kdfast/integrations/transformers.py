"""Distil a Hugging Face ``transformers`` causal LM with kdfast's fused-linear losses.

Neither model's ``[batch, seq, vocab]`` logits are built: the student's and the teacher's final
hidden states come from their backbones (``model.base_model``), and kdfast projects them through
the LM heads (``model.get_output_embeddings()``) a chunk of rows at a time, computing the
divergence and its gradient on the way (:func:`kdfast.fused_linear_divergence_loss`, or
:func:`kdfast.fused_linear_topk_divergence_loss` for a sparse teacher given by its top-k).
What the model's own ``forward`` does to its logits is applied too: a logit scale (Cohere,
Granite, MiniCPM3, Falcon-H1, ...) and a final softcap (Gemma 2/3, ...), read from the config.
Tied embeddings need nothing special: the head's weight *is* the embedding, and its gradient lands
there. Labels are shifted as transformers' ``ForCausalLMLoss`` does (position ``i`` predicts label
``i + 1``; ``-100`` is ignored; ``shift_labels`` is used as given).

This module imports ``transformers``; it is importable only where that package is installed.

Public API:

* :func:`causal_lm_distillation_loss` -- the loss of one batch (student, teacher, batch).
* :class:`KDTrainer` -- a ``transformers.Trainer`` whose loss is that function, the teacher frozen.
* :func:`teacher_topk` -- a teacher's top-k token ids and log-probabilities, for a sparse teacher.
* :func:`output_head`, :func:`logit_transform`, :func:`verify_output_head` -- how kdfast reads a
  model's LM head, and a check that this reproduces ``model(...).logits``.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as error:  # pragma: no cover - exercised only where transformers is missing
    raise ImportError(
        "kdfast.integrations.transformers needs the `transformers` package, which is not installed "
        "(pip install transformers). kdfast itself does not depend on it: the losses "
        "(kdfast.fused_linear_divergence_loss, ...) work on plain tensors without it.") from error

from ..fused_linear import fused_linear_divergence_loss
from ..fused_linear_topk import fused_linear_topk_divergence_loss
from ..parallel.linear import full_weight

__all__ = ["causal_lm_distillation_loss", "KDTrainer", "teacher_topk", "output_head", "logit_transform",
           "verify_output_head", "OutputHead", "TOPK_KEYS"]

#: batch keys of a sparse teacher: [batch, seq, k] token ids and log-probabilities, aligned with the
#: positions like the logits are (entry ``i`` is the teacher's distribution of token ``i + 1``)
TOPK_KEYS = ("teacher_topk_indices", "teacher_topk_logprobs")

#: batch keys that are targets or loss inputs, never passed to a model's forward
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch", "return_loss", "logits_to_keep") + TOPK_KEYS


# ----------------------------------------------------------------------------------- the LM head


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output projection as kdfast uses it: ``logits = transform(hidden @ weight.T +
    bias)`` with ``transform(z) = softcap·tanh(logit_scale·z/softcap)`` (``logit_scale·z`` without a
    softcap)."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    logit_scale: float = 1.0
    softcap: Optional[float] = None


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


#: model types whose forward multiplies the logits by ``config.logits_scaling`` (the other users of
#: that name, Granite and its MoE/SWA variants, divide by it)
_MULTIPLY_LOGITS_SCALING = ("hyperclovax", "hyperclovax_vision_v2")


def logit_transform(model: nn.Module) -> Tuple[float, Optional[float]]:
    """``(logit_scale, softcap)`` that ``model``'s forward applies to ``lm_head(hidden)``, read from
    its (text) config as transformers' modelling code uses it:

    * ``final_logit_softcapping`` (Gemma 2/3, ...): ``c·tanh(z/c)``, after any scale;
    * ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1): a factor;
    * ``logits_scaling``: a divisor (Granite; MiniCPM3 divides the hidden states, the same thing
      for a bias-free head), a factor for HyperCLOVA X.

    An architecture that post-processes its logits in another way is not seen here:
    :func:`verify_output_head` (which :class:`KDTrainer` runs once) detects that.

    Args:
        model: a transformers causal LM (``PreTrainedModel`` with a config).

    Returns:
        ``(scale, softcap)``; ``softcap`` is ``None`` without a softcap.
    """
    config = _text_config(model)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, name, None) is not None:
            scale = float(getattr(config, name))
            break
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = float(config.logits_scaling)
        scale = scaling if getattr(config, "model_type", None) in _MULTIPLY_LOGITS_SCALING else 1.0 / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else scale), (None if softcap is None else float(softcap))


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside data-parallel and PEFT wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def output_head(model: nn.Module, name: str = "model") -> OutputHead:
    """The LM head of a causal LM: ``model.get_output_embeddings()``, which must be a plain
    ``torch.nn.Linear``, and :func:`logit_transform`.

    Args:
        model: a transformers causal LM (wrappers such as DDP or PEFT are looked through).
        name: how errors name the model (``"student"``, ``"teacher"``).

    Raises:
        ValueError: no output embeddings, or a weight that is a ZeRO-3 placeholder.
        TypeError: the head is not a plain ``nn.Linear`` (e.g. a quantised or adapter layer).
    """
    model = _unwrap(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(f"{name} ({type(model).__name__}) has no output embeddings (get_output_embeddings() "
                         "returned None): kdfast distils causal LMs through their linear LM head")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(f"{name}'s LM head (get_output_embeddings()) is a {type(head).__name__}; kdfast projects "
                        "the hidden states itself and needs a plain torch.nn.Linear head (weight [vocab, hidden]). "
                        "Quantised or adapter-wrapped heads are not supported: keep the head in full precision "
                        "and outside the adapter's target_modules")
    tied = getattr(_text_config(model), "tie_word_embeddings", False)
    embeddings = model.get_input_embeddings() if tied and hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", head.weight) is not head.weight:
        # fully_shard puts a parameter shared by two FSDP units into each of them separately
        raise ValueError(f"{name}'s config ties the LM head to the input embeddings, but they are now two different "
                         "parameters (fully_shard of a module holding only one of them unties them). Keep the "
                         "embeddings and the LM head in the same FSDP unit, or untie them (tie_word_embeddings=False)")
    # an FSDP2 DTensor: gathered once, its gradient reduce-scattered back to the shards (averaged)
    weight, bias = full_weight(head.weight), full_weight(head.bias)
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{name}'s LM head weight has shape {tuple(weight.shape)}: a sharded placeholder "
                         "(DeepSpeed ZeRO-3?). Gather it first, e.g. inside deepspeed.zero.GatheredParameters")
    scale, softcap = logit_transform(model)
    return OutputHead(weight, bias, scale, softcap)


# ------------------------------------------------------------------------------ the hidden states


def _backbone(model: nn.Module, name: str) -> nn.Module:
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        get_decoder = getattr(model, "get_decoder", None)
        base = get_decoder() if callable(get_decoder) else None
    if base is None or base is model:
        raise ValueError(f"{name} ({type(model).__name__}) has no separate backbone (model.base_model is the model "
                         "itself and get_decoder() gives none): kdfast needs the final hidden states before the "
                         "LM head, which it reads from the backbone's last_hidden_state")
    return base


def _forward_kwargs(module: nn.Module, batch: Mapping[str, Any]) -> dict:
    kwargs = {k: v for k, v in batch.items() if k not in _LOSS_KEYS}
    parameters = inspect.signature(module.forward).parameters
    if "use_cache" in parameters:
        kwargs["use_cache"] = False  # no KV cache in training: it would only hold memory
    return kwargs


def last_hidden_state(model: nn.Module, batch: Mapping[str, Any], name: str = "model") -> torch.Tensor:
    """The final hidden states ``[batch, seq, hidden]`` that ``model``'s LM head reads: the
    backbone's ``last_hidden_state`` (after its final norm), for the model inputs of ``batch``
    (every key but the labels and the top-k teacher)."""
    model = _unwrap(model)
    backbone = _backbone(model, name)
    outputs = backbone(**_forward_kwargs(backbone, batch))
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None and isinstance(outputs, (tuple, list)) and outputs:
        hidden = outputs[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"{name}'s backbone ({type(backbone).__name__}) returned no last_hidden_state of shape "
                         f"[batch, seq, hidden] (got {type(outputs).__name__}); kdfast needs the final hidden states")
    return hidden


def shifted_labels(batch: Mapping[str, Any], ignore_index: int = -100) -> torch.Tensor:
    """The target of every position ``[batch, seq]``, as transformers' ``ForCausalLMLoss`` builds
    it: ``batch["shift_labels"]`` as given, else ``labels[..., 1:]`` padded with ``ignore_index`` at
    the end (the last position predicts nothing). Without labels, the labels are the
    ``input_ids`` with the padding (``attention_mask == 0``) set to ``ignore_index``, as
    ``DataCollatorForLanguageModeling(mlm=False)`` makes them."""
    if batch.get("shift_labels") is not None:
        return batch["shift_labels"]
    labels = batch.get("labels")
    if labels is None:
        if batch.get("input_ids") is None:
            raise ValueError("batch has neither labels, shift_labels nor input_ids: kdfast needs one of them to "
                             "know which positions count")
        labels = batch["input_ids"]
        if batch.get("attention_mask") is not None:
            labels = labels.masked_fill(batch["attention_mask"] == 0, ignore_index)
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


class _EvalMode:
    """The teacher in eval mode (no dropout) for the duration, then as it was."""

    def __init__(self, module):
        self.module, self.training = module, module.training

    def __enter__(self):
        if self.training:
            self.module.eval()

    def __exit__(self, *exc):
        if self.training:
            self.module.train()


def _redirect(wrapper: Optional[nn.Module], module: nn.Module, method: Callable, *args, **kwargs):
    """Call ``method`` through ``wrapper``'s forward when ``module`` is wrapped (DDP, FSDP, ...), so
    the wrapper's forward hooks run (DDP's gradient bookkeeping, FSDP's parameter gathering) though
    the loss calls the backbone, not the model's forward."""
    if wrapper is None or wrapper is module:
        return method(*args, **kwargs)
    original = module.forward

    def forward(*_args, **_kwargs):
        module.forward = original
        return method(*_args, **_kwargs)

    module.forward = forward
    try:
        return wrapper(*args, **kwargs)
    finally:
        module.forward = original


# ---------------------------------------------------------------------------------------- the loss

_DENSE_ONLY = ("skew_alpha",)
_SPARSE_ONLY = ("tail", "teacher_temperature", "reverse_kl_floor")


def _distill(student: nn.Module, teacher: Optional[nn.Module], batch: Mapping[str, Any], target: torch.Tensor, *,
             positions: Optional[slice] = None, student_wrapper: Optional[nn.Module] = None,
             teacher_wrapper: Optional[nn.Module] = None, **options) -> torch.Tensor:
    """The loss of ``batch`` with ``target`` ``[batch, seq']`` for the hidden states at ``positions``
    (all of them by default)."""
    student, topk = _unwrap(student), tuple(batch.get(k) for k in TOPK_KEYS)
    sparse = topk[0] is not None or topk[1] is not None
    if sparse and teacher is not None:
        raise ValueError("got both a teacher model and a sparse teacher (batch['teacher_topk_indices'], "
                         "batch['teacher_topk_logprobs']); pass teacher=None to distil from the top-k")
    if not sparse and teacher is None:
        raise ValueError("teacher is None and the batch has no sparse teacher: give a teacher model, or "
                         "batch['teacher_topk_indices'] and batch['teacher_topk_logprobs'] ([batch, seq, k])")
    if sparse and (topk[0] is None or topk[1] is None):
        raise ValueError("a sparse teacher needs both batch['teacher_topk_indices'] and "
                         "batch['teacher_topk_logprobs']")
    where = slice(None) if positions is None else positions

    s_head = output_head(student, "student")
    dtype, device = s_head.weight.dtype, s_head.weight.device
    s_hidden = _redirect(student_wrapper, student, last_hidden_state, student, batch, "student")[:, where]
    if s_hidden.shape[:2] != target.shape:
        raise ValueError(f"the labels give targets of shape {tuple(target.shape)} but the student's hidden states "
                         f"have [batch, seq] = {tuple(s_hidden.shape[:2])}")
    # The head's dtype, as nn.Linear without autocast: kdfast runs its GEMMs in it (fp32 on a CPU
    # without bf16/fp16 matrix units) and accumulates the weight gradient in fp32.
    s_hidden = s_hidden.to(device=device, dtype=dtype)
    target = target.to(device)
    common = {k: v for k, v in options.items() if k not in _DENSE_ONLY + _SPARSE_ONLY}
    with torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext():
        if sparse:
            indices, logprobs = (t[:, where].to(device) for t in topk)
            return fused_linear_topk_divergence_loss(
                s_hidden, s_head.weight, indices, logprobs.to(dtype), target, student_bias=s_head.bias,
                student_logit_scale=s_head.logit_scale, student_softcap=s_head.softcap,
                **common, **{k: v for k, v in options.items() if k in _SPARSE_ONLY})

        teacher = _unwrap(teacher)
        t_head = output_head(teacher, "teacher")
        if t_head.weight.device != device:
            raise ValueError(f"the teacher's LM head is on {t_head.weight.device} but the student's is on {device}: "
                             "kdfast projects both chunk by chunk, so place both heads on the same device")
        with torch.no_grad(), _EvalMode(teacher):
            t_hidden = _redirect(teacher_wrapper, teacher, last_hidden_state, teacher, batch, "teacher")[:, where]
        # A teacher held in another dtype (e.g. bf16 next to an fp32 student) is cast to the
        # student's: kdfast's kernels take one dtype for both sides.
        t_weight = t_head.weight.detach().to(dtype)
        t_bias = None if t_head.bias is None else t_head.bias.detach().to(dtype)
        return fused_linear_divergence_loss(
            s_hidden, s_head.weight, t_hidden.to(device=device, dtype=dtype), t_weight, target,
            student_bias=s_head.bias, teacher_bias=t_bias,
            student_logit_scale=s_head.logit_scale, student_softcap=s_head.softcap,
            teacher_logit_scale=t_head.logit_scale, teacher_softcap=t_head.softcap,
            **common, **{k: v for k, v in options.items() if k in _DENSE_ONLY})


def causal_lm_distillation_loss(student: nn.Module, teacher: Optional[nn.Module], batch: Mapping[str, Any], *,
                                divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                                t2_scaling: bool = False, alpha: float = 1.0, skew_alpha: float = 0.1,
                                mixed_kl_weight: float = 0.5, tail: str = "renormalize",
                                teacher_temperature: Optional[float] = None,
                                reverse_kl_floor: Optional[float] = None, reduction: str = "batchmean",
                                num_items_in_batch=None, ignore_index: int = -100,
                                chunk_size: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Distillation loss of a transformers causal LM against a teacher, without materialising
    either model's logits.

    Per counted position (label ≠ ``ignore_index``), with z^s, z^t the logits the models' forwards
    would return (LM head, logit scale and softcap included), p = softmax(z^s/T), q = softmax(z^t/T):

        ℓ = α·(T² if t2_scaling)·D(p, q) + (1 − α)·CE(z^s, label)

    D as :func:`kdfast.divergence_loss` (``"forward_kl"`` KL(q‖p), ``"reverse_kl"``, ``"mixed_kl"``,
    ``"jsd"`` = TRL's generalized JSD(β), ``"tvd"``, ``"skew_forward_kl"``, ``"skew_reverse_kl"``).
    The CE term is exactly the model's own ``outputs.loss``. With ``reduction="batchmean"`` the sum
    is divided by the number of counted positions, or by ``num_items_in_batch`` when given (the
    ``transformers.Trainer`` convention for gradient accumulation).

    The student's backbone runs with autograd; the teacher's runs under ``torch.no_grad()`` and in
    eval mode (restored afterwards). Both heads are read by :func:`output_head`; the loss is
    :func:`kdfast.fused_linear_divergence_loss` (dense teacher) or
    :func:`kdfast.fused_linear_topk_divergence_loss` (sparse teacher: ``teacher=None`` and the
    batch holds ``teacher_topk_indices`` / ``teacher_topk_logprobs``, e.g. from
    :func:`teacher_topk`). The student's head dtype is the compute dtype (autocast is off inside
    the loss); a teacher in another dtype is cast to it. Vocabulary sizes may differ (the smaller is
    zero-padded, see :mod:`kdfast.fused_linear`).

    Args:
        student: the causal LM being trained (``PreTrainedModel``; DDP / PEFT wrappers are looked
            through, but call it inside the wrapper's forward, as :class:`KDTrainer` does).
        teacher: the teacher causal LM, or ``None`` for a sparse teacher in ``batch``.
        batch: the model inputs (``input_ids``, ``attention_mask``, ...: every key except the ones
            below is passed to both backbones) and the targets: ``labels`` (shifted here, as
            transformers does), or ``shift_labels`` (used as given), or neither (``input_ids``
            with the padding ignored). Optionally ``teacher_topk_indices`` and
            ``teacher_topk_logprobs`` ``[batch, seq, k]``, aligned like logits.
        divergence, beta, temperature, t2_scaling, alpha, skew_alpha, mixed_kl_weight: as
            :func:`kdfast.fused_linear_divergence_loss`.
        tail, teacher_temperature, reverse_kl_floor: the sparse teacher's options, as
            :func:`kdfast.fused_linear_topk_divergence_loss`.
        reduction: ``"batchmean"``, ``"sum"`` or ``"mean"`` (÷ rows·V).
        num_items_in_batch: the ``batchmean`` divisor (a number or a 0-dim tensor).
        ignore_index: the label of positions that do not count.
        chunk_size, backend: passed to the kdfast loss (``backend="reference"`` materialises the
            logits: the specification the fused path is tested against).

    Shape:
        - input_ids, attention_mask, labels: ``[batch, seq]``.
        - teacher_topk_indices, teacher_topk_logprobs: ``[batch, seq, k]``.
        - Output: a scalar.

    Examples::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...               num_attention_heads=2, num_key_value_heads=2)
        >>> student = LlamaForCausalLM(LlamaConfig(**config))
        >>> teacher = LlamaForCausalLM(LlamaConfig(**config))
        >>> batch = dict(input_ids=torch.randint(0, 128, (2, 16)))
        >>> batch["labels"] = batch["input_ids"]
        >>> loss = causal_lm_distillation_loss(student, teacher, batch, divergence="jsd", beta=0.5)
        >>> loss.backward()
    """
    target = shifted_labels(batch, ignore_index)
    return _distill(student, teacher, batch, target, divergence=divergence, beta=beta, temperature=temperature,
                    t2_scaling=t2_scaling, alpha=alpha, skew_alpha=skew_alpha, mixed_kl_weight=mixed_kl_weight,
                    tail=tail, teacher_temperature=teacher_temperature, reverse_kl_floor=reverse_kl_floor,
                    reduction=reduction, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                    chunk_size=chunk_size, backend=backend)


@torch.no_grad()
def teacher_topk(teacher: nn.Module, batch: Mapping[str, Any], k: int, *, temperature: float = 1.0,
                 chunk_size: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """A teacher's top-k next-token distribution at every position, without building its
    ``[batch, seq, vocab]`` logits (``chunk_size`` rows at a time), in eval mode.

    The result goes into a batch as ``teacher_topk_indices`` / ``teacher_topk_logprobs`` (e.g.
    computed once, offline) for :func:`causal_lm_distillation_loss` with ``teacher=None``; pass the
    same ``temperature`` as ``teacher_temperature`` there when it is not the loss's.

    Args:
        teacher: a transformers causal LM.
        batch: its model inputs (``input_ids``, ``attention_mask``, ...).
        k: entries per position.
        temperature: the log-probabilities are ``log_softmax(z/temperature)`` of the teacher's
            logits z (logit scale and softcap applied).
        chunk_size: positions projected at a time.

    Shape:
        Output: ``indices`` (int64) and ``logprobs`` (fp32), each ``[batch, seq, k]``.

    Examples::

        >>> idx, logprobs = teacher_topk(teacher, dict(input_ids=ids), k=8)
        >>> batch = dict(input_ids=ids, labels=ids, teacher_topk_indices=idx, teacher_topk_logprobs=logprobs)
        >>> loss = causal_lm_distillation_loss(student, None, batch)
    """
    teacher = _unwrap(teacher)
    head = output_head(teacher, "teacher")
    with _EvalMode(teacher):
        hidden = last_hidden_state(teacher, batch, "teacher")
    leading = hidden.shape[:-1]
    rows = hidden.reshape(-1, hidden.shape[-1]).to(device=head.weight.device, dtype=head.weight.dtype)
    if not 0 < k <= head.weight.shape[0]:
        raise ValueError(f"k must be in [1, {head.weight.shape[0]}] (the teacher's vocabulary), got {k}")
    indices, logprobs = [], []
    for start in range(0, rows.shape[0], chunk_size):
        logits = F.linear(rows[start:start + chunk_size], head.weight, head.bias).float()
        if head.softcap is not None:
            logits = head.softcap * torch.tanh(logits * (head.logit_scale / head.softcap))
        elif head.logit_scale != 1.0:
            logits = logits * head.logit_scale
        values, ids = torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
        indices.append(ids)
        logprobs.append(values)
    return torch.cat(indices).reshape(*leading, k), torch.cat(logprobs).reshape(*leading, k)


@torch.no_grad()
def verify_output_head(model: nn.Module, batch: Mapping[str, Any], name: str = "model", *,
                       max_positions: int = 32) -> None:
    """Check that kdfast's view of ``model`` (backbone hidden states, :func:`output_head`) gives the
    logits ``model(...)`` returns, on the first sequence of ``batch`` cut to ``max_positions``
    tokens (a small forward: the [1, max_positions, V] logits only).

    Raises:
        ValueError: they differ (an architecture that post-processes its logits in a way
            :func:`logit_transform` does not know), naming the model and the error.
    """
    model = _unwrap(model)
    small = {k: (v[:1, :max_positions] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v)
             for k, v in batch.items() if k not in _LOSS_KEYS}
    with _EvalMode(model):
        expected = model(**small, use_cache=False).logits.float()
        hidden = last_hidden_state(model, small, name)
    head = output_head(model, name)
    logits = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits * (head.logit_scale / head.softcap))
    else:
        logits = logits * head.logit_scale
    tolerance = (1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2) \
        * max(1.0, expected.abs().max().item())
    error = (logits - expected).abs().max().item()
    if not error <= tolerance:
        raise ValueError(f"{name} ({type(model).__name__}): the logits kdfast builds from the backbone's hidden "
                         f"states and get_output_embeddings() (logit scale {head.logit_scale}, softcap "
                         f"{head.softcap}) differ from model(...).logits by {error:.3g} (tolerance {tolerance:.3g}). "
                         "This architecture post-processes its logits in a way kdfast does not read from its config")


# ------------------------------------------------------------------------------------- the Trainer


class KDTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (the student) by distillation from
    ``teacher_model`` with :func:`causal_lm_distillation_loss`: no logits of either model are
    built, so the loss's memory is a few chunks instead of several ``[batch, seq, vocab]`` tensors.

    The teacher is frozen (``requires_grad_(False)``), kept in eval mode and run under
    ``torch.no_grad()``; it is placed on the training device by accelerate. ``num_items_in_batch``
    from the Trainer is the loss's divisor, so gradient accumulation weighs tokens as the plain
    Trainer does. On the first step both models are checked once with :func:`verify_output_head`
    (a 32-token forward), so an architecture whose logits kdfast would rebuild wrongly fails loudly.
    Evaluation reports the same loss (``eval_loss``) and no logits (there are none).

    A dataset with a sparse teacher (``teacher_model=None``) carries ``teacher_topk_indices`` and
    ``teacher_topk_logprobs`` columns; they are kept by ``remove_unused_columns``.

    Args:
        model: the student causal LM.
        teacher_model: the teacher causal LM (same tokenizer), or ``None`` for a sparse teacher.
        args: ``transformers.TrainingArguments``.
        divergence, beta, temperature, t2_scaling, alpha: the loss (see
            :func:`causal_lm_distillation_loss`); ``alpha < 1`` adds (1 − α)·CE with the labels.
        loss_options: the other keyword arguments of :func:`causal_lm_distillation_loss`
            (``skew_alpha``, ``tail``, ``chunk_size``, ``backend``, ...).
        verify_heads: run :func:`verify_output_head` on the first batch.
        **kwargs: the other arguments of ``transformers.Trainer`` (``train_dataset``,
            ``data_collator``, ``eval_dataset``, ...).

    Examples::

        >>> trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments("out"),
        ...                     train_dataset=dataset, data_collator=collator, divergence="jsd", beta=0.5)
        >>> trainer.train()
    """

    def __init__(self, model=None, teacher_model=None, args=None, *, divergence: str = "forward_kl",
                 beta: float = 0.5, temperature: float = 1.0, t2_scaling: bool = False, alpha: float = 1.0,
                 loss_options: Optional[dict] = None, verify_heads: bool = True, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError("KDTrainer does not support nn.DataParallel (several GPUs visible to one process): "
                             "launch with torchrun / accelerate launch, or make one GPU visible")
        self.loss_options = dict(divergence=divergence, beta=beta, temperature=temperature, t2_scaling=t2_scaling,
                                 alpha=alpha, **(loss_options or {}))
        unknown = set(self.loss_options) - set(inspect.signature(causal_lm_distillation_loss).parameters)
        if unknown or "num_items_in_batch" in self.loss_options:
            raise TypeError(f"loss_options has unknown keys {sorted(unknown or {'num_items_in_batch'})}; the keys are "
                            "the keyword arguments of causal_lm_distillation_loss (num_items_in_batch comes from "
                            "the Trainer)")
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            teacher_model.eval()
            teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.teacher_model = teacher_model
        self._heads_verified = not verify_heads

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # The loss reads these columns; the student's forward signature does not name them.
        extra = [k for k in ("labels", "shift_labels") + TOPK_KEYS if k not in self._signature_columns]
        self._signature_columns = list(self._signature_columns) + extra

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        teacher = None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)
        if not self._heads_verified:
            verify_output_head(student, inputs, "student")
            if teacher is not None:
                verify_output_head(teacher, inputs, "teacher")
            self._heads_verified = True
        target = shifted_labels(inputs, self.loss_options.get("ignore_index", -100))
        loss = _distill(student, teacher, inputs, target, student_wrapper=model, teacher_wrapper=self.teacher_model,
                        num_items_in_batch=num_items_in_batch, **self.loss_options)
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            # As Trainer.compute_loss: num_items_in_batch counts every process's tokens, and DDP
            # averages the gradients over the processes.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss
