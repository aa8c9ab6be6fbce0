"""Parity with the libraries kdfast is measured against (optional: skipped unless installed, the
``test`` extra installs them).

* TRL 1.16 ``GKDTrainer.generalized_jsd_loss`` (dense logits) = ``kdfast.divergence_loss(
  divergence="jsd", beta=β, temperature=T)`` with ``t2_scaling=False``, for β ∈ {0, 0.3, 0.5, 1}
  (0 and 1 are TRL's plain forward and reverse KL branches), every reduction TRL has, ignored labels
  and ``num_items_in_batch``; gradients included.
* TRL 1.16 ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (hidden states + LM heads,
  vocabulary tiles, CPU path folded in PyTorch) returns per-token divergences: their sum equals kdfast's
  ``reduction="sum"``; its logit scale and final softcap match kdfast's ``*_logit_scale``/``*_softcap``.
* Liger-Kernel 0.8.5 ``chunked_loss.LigerFusedLinearJSDLoss`` (the only chunked distillation loss
  of 0.8.5; β = 0 / 1 give forward / reverse KL) returns
  ``w_hard·CE(z^s at T=1) + w_soft·JSD_β(T)``, both sums over the non-ignored rows divided by their
  count. That is ``(w_hard + w_soft)·kdfast(..., alpha=w_soft/(w_hard + w_soft), reduction="batchmean")``.

kdfast's fused-linear side is ``kdfast.fused_linear_divergence_loss`` when the package has it, and
always ``kdfast.divergence_loss`` on materialised logits (``hidden @ W.T + b``).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import kdfast

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _trl_jsd():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return module.GKDTrainer.generalized_jsd_loss


def _trl_chunked():
    pytest.importorskip("trl")
    return pytest.importorskip("trl.kernels.chunked_divergence")


def _liger_jsd():
    pytest.importorskip("liger_kernel")
    return pytest.importorskip("liger_kernel.chunked_loss").LigerFusedLinearJSDLoss


BETAS = [0.0, 0.3, 0.5, 1.0]
DIVERGENCE_OF_BETA = {0.0: "forward_kl", 1.0: "reverse_kl"}


def _close(actual, expected, what, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _logits(shape, seed, scale=3.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def _labels(shape, vocab, seed, ignored=0.25):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < ignored] = -100
    return labels


# --------------------------------------------------------------------------- TRL, dense logits


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_trl_generalized_jsd_loss(beta, temperature, reduction, backend):
    trl_loss = _trl_jsd()
    student, teacher = _logits((2, 5, 37), 0), _logits((2, 5, 37), 1)
    labels = _labels((2, 5), 37, 2)
    theirs_in = student.clone().requires_grad_()
    ours_in = student.clone().requires_grad_()
    theirs = trl_loss(theirs_in, teacher, labels=labels, beta=beta, temperature=temperature, reduction=reduction)
    ours = kdfast.divergence_loss(ours_in, teacher, labels, divergence="jsd", beta=beta, temperature=temperature,
                                  reduction=reduction, backend=backend)
    _close(ours, theirs.to(ours.dtype), "loss")
    theirs.backward()
    ours.backward()
    _close(ours_in.grad, theirs_in.grad, "student gradient")
    if beta in DIVERGENCE_OF_BETA:  # TRL's endpoints are the plain KLs, so are kdfast's named forms
        plain = kdfast.divergence_loss(student, teacher, labels, divergence=DIVERGENCE_OF_BETA[beta],
                                       temperature=temperature, reduction=reduction, backend=backend)
        _close(plain, theirs.detach(), "named divergence")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_num_items_in_batch(beta, backend):
    """TRL divides the sum over non-ignored rows by ``num_items_in_batch`` whatever the reduction."""
    trl_loss = _trl_jsd()
    student, teacher = _logits((3, 4, 29), 3), _logits((3, 4, 29), 4)
    labels = _labels((3, 4), 29, 5)
    for items in (17, torch.tensor(23)):
        theirs = trl_loss(student, teacher, labels=labels, beta=beta, temperature=1.5, num_items_in_batch=items)
        ours = kdfast.divergence_loss(student, teacher, labels, divergence="jsd", beta=beta, temperature=1.5,
                                      num_items_in_batch=items, backend=backend)
        _close(ours, theirs, f"num_items_in_batch={items}")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_trl_batchmean_without_labels_divides_by_dim0(backend):
    """A convention difference, pinned: without labels TRL's ``batchmean`` divides by ``size(0)`` of
    the [B, S, V] input (B sequences), kdfast by the number of rows (B·S tokens)."""
    trl_loss = _trl_jsd()
    student, teacher = _logits((2, 6, 31), 6), _logits((2, 6, 31), 7)
    theirs = trl_loss(student, teacher, labels=None, beta=0.5)
    ours = kdfast.divergence_loss(student, teacher, divergence="jsd", beta=0.5, backend=backend)
    _close(ours * 6, theirs, "batchmean without labels (×S)")
    flat = trl_loss(student.reshape(12, 31), teacher.reshape(12, 31), labels=None, beta=0.5)
    _close(ours, flat, "batchmean on [N, V]")


# --------------------------------------------------------------------------- fused-linear inputs


def _heads(rows, hidden_s, hidden_t, vocab, seed, bias=False, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    tensors = dict(student_hidden=randn(rows, hidden_s), student_weight=randn(vocab, hidden_s, scale=hidden_s ** -0.5),
                   teacher_hidden=randn(rows, hidden_t), teacher_weight=randn(vocab, hidden_t, scale=hidden_t ** -0.5))
    if bias:
        tensors.update(student_bias=randn(vocab, scale=0.5), teacher_bias=randn(vocab, scale=0.5))
    return tensors


def _materialised(tensors, target=None, backend="reference", **options):
    """kdfast.divergence_loss on the full logits."""
    student = tensors["student_hidden"] @ tensors["student_weight"].T
    teacher = tensors["teacher_hidden"] @ tensors["teacher_weight"].T
    if tensors.get("student_bias") is not None:
        student = student + tensors["student_bias"]
        teacher = teacher + tensors["teacher_bias"]
    return kdfast.divergence_loss(student, teacher.detach(), target, backend=backend, **options)


def _fused(tensors, target=None, backend="auto", **options):
    return kdfast.fused_linear_divergence_loss(
        tensors["student_hidden"], tensors["student_weight"], tensors["teacher_hidden"], tensors["teacher_weight"],
        target, student_bias=tensors.get("student_bias"), teacher_bias=tensors.get("teacher_bias"),
        backend=backend, **options)


#: kdfast's side of the fused-linear comparisons: the materialised reference (always there), and
#: fused_linear_divergence_loss on its reference and its default ("auto": a fused row kernel per chunk)
KDFAST_SIDES = ["materialised-reference"] + (["fused-reference", "fused-auto"]
                                             if hasattr(kdfast, "fused_linear_divergence_loss") else [])


def _kdfast(side, tensors, target=None, **options):
    kind, backend = side.split("-")
    return (_fused if kind == "fused" else _materialised)(tensors, target, backend=backend, **options)


def _with_grad(tensors):
    """A copy with the student's hidden states, weight and bias requiring gradients."""
    copy = {name: value.clone() for name, value in tensors.items()}
    for name in ("student_hidden", "student_weight", "student_bias"):
        if name in copy:
            copy[name].requires_grad_()
    return copy


def _grads(tensors):
    return {name: tensors[name].grad for name in ("student_hidden", "student_weight", "student_bias")
            if name in tensors}


def _compare_grads(ours, theirs):
    for name, grad in _grads(theirs).items():
        assert grad is not None, name
        _close(_grads(ours)[name], grad, f"d/d{name}")


@pytest.mark.parametrize("side", KDFAST_SIDES)
@pytest.mark.parametrize("beta", BETAS)
def test_trl_chunked_divergence(beta, side, monkeypatch):
    """Per-token divergences of TRL's fused kernel (CPU fallback), folded over several vocabulary
    and token tiles (the module's tile sizes shrunk), summed = kdfast ``reduction="sum"``."""
    chunked = _trl_chunked()
    monkeypatch.setattr(chunked, "VOCAB_CHUNK_SIZE", 16)
    monkeypatch.setattr(chunked, "TOKEN_CHUNK_SIZE", 8)
    base = _heads(20, 12, 16, 50, seed=10, bias=True)
    theirs_in, ours_in = _with_grad(base), _with_grad(base)
    per_token, entropy = chunked.ChunkedDivergenceFunction.apply(
        theirs_in["student_hidden"], theirs_in["student_weight"], theirs_in["student_bias"],
        theirs_in["teacher_hidden"], theirs_in["teacher_weight"], theirs_in["teacher_bias"], beta, 2.0)
    ours = _kdfast(side, ours_in, divergence="jsd", beta=beta, temperature=2.0, reduction="sum")
    _close(ours, per_token.sum(), "loss", rtol=5e-5, atol=5e-5)
    per_token.sum().backward()
    ours.backward()
    _compare_grads(ours_in, theirs_in)


@pytest.mark.parametrize("side", KDFAST_SIDES)
def test_trl_chunked_divergence_scale_and_softcap(side):
    """TRL: softcap·tanh(scale·z/softcap), then 1/T, per model = kdfast's transform."""
    chunked = _trl_chunked()
    base = _heads(12, 8, 8, 40, seed=11)
    for name in ("student_weight", "teacher_weight"):
        base[name] = base[name] * 6  # logits large enough for the softcap to matter
    theirs_in, ours_in = _with_grad(base), _with_grad(base)
    per_token, _ = chunked.ChunkedDivergenceFunction.apply(
        theirs_in["student_hidden"], theirs_in["student_weight"], None,
        theirs_in["teacher_hidden"], theirs_in["teacher_weight"], None, 0.5, 1.5, 0.8, 4.0, 1.25, 5.0)
    ours = _kdfast(side, ours_in, divergence="jsd", beta=0.5, temperature=1.5, reduction="sum",
                   student_logit_scale=0.8, student_softcap=4.0, teacher_logit_scale=1.25, teacher_softcap=5.0)
    _close(ours, per_token.sum(), "loss", rtol=5e-5, atol=5e-5)
    per_token.sum().backward()
    ours.backward()
    _compare_grads(ours_in, theirs_in)


# --------------------------------------------------------------------------- Liger chunked loss


@pytest.mark.parametrize("side", KDFAST_SIDES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("weights", [(0.0, 1.0), (0.5, 0.5), (0.3, 0.7), (1.0, 1.0)])
def test_liger_fused_linear_jsd_loss(weights, beta, side):
    """Liger: w_hard·CE(student logits, T = 1) + w_soft·JSD_β(T), each Σ over non-ignored rows /
    their count (clamped to 1), no T². kdfast: α·JSD + (1 − α)·CE, batchmean over the same rows."""
    liger_loss = _liger_jsd()
    weight_hard, weight_soft = weights
    base = _heads(24, 12, 16, 45, seed=20, bias=True)
    target = _labels((24,), 45, 21)
    theirs_in, ours_in = _with_grad(base), _with_grad(base)
    module = liger_loss(weight_hard_loss=weight_hard, weight_soft_loss=weight_soft, beta=beta, temperature=2.0,
                        compiled=False, chunk_size=8)
    theirs = module(theirs_in["student_hidden"], theirs_in["student_weight"], theirs_in["teacher_hidden"],
                    theirs_in["teacher_weight"], target, theirs_in["student_bias"], theirs_in["teacher_bias"])
    scale = weight_hard + weight_soft
    ours = scale * _kdfast(side, ours_in, target, divergence="jsd", beta=beta, temperature=2.0,
                           alpha=weight_soft / scale, reduction="batchmean")
    _close(ours, theirs, "loss", rtol=5e-5, atol=5e-5)
    theirs.backward()
    ours.backward()
    _compare_grads(ours_in, theirs_in)


@pytest.mark.parametrize("side", KDFAST_SIDES)
def test_liger_all_rows_ignored_is_zero(side):
    """Both clamp the row count to 1: every row ignored gives 0, not NaN."""
    liger_loss = _liger_jsd()
    base = _heads(8, 6, 6, 20, seed=30)
    target = torch.full((8,), -100)
    theirs = liger_loss(weight_hard_loss=0.5, weight_soft_loss=0.5, compiled=False)(
        base["student_hidden"], base["student_weight"], base["teacher_hidden"], base["teacher_weight"], target)
    ours = 2 * _kdfast(side, base, target, divergence="jsd", beta=0.5, alpha=0.5)
    assert float(theirs) == 0.0 and float(ours) == 0.0
