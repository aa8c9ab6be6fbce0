"""Autograd around the fused kernels in every mode a training or evaluation loop uses, on every
backend (the reference shows what is expected):

* fp16 with torch.amp.GradScaler at its default scale (65536): the upstream factor is applied in
  fp32 before the gradient's one rounding (no inf, no flushed entries), a few training steps equal
  the reference's;
* nothing autograd needs again is handed out to be mutated: retain_graph + zero_grad(set_to_none=False)
  + a second backward, in-place scaling of ``.grad``, torch.autograd.grad twice;
* create_graph=True: differentiating the gradient raises a clear error (the kernels compute first
  derivatives only);
* no_grad, inference_mode, a student without requires_grad: the loss only (no [N, C] gradient).
"""
from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast.backends._fused import SECOND_DERIVATIVE_ERROR

FAMILIES = {
    "kd": lambda backend, x, t, y: backend.call("kd_loss", x, t, y, alpha=0.5),
    "skd": lambda backend, x, t, y: backend.call("skd_loss", x, t, y, alpha=0.5),
    "nd": lambda backend, x, t, y: backend.call("nd_loss", x, t, y % 3, _centres(x)),
    "nystrom": lambda backend, x, t, y: backend.call("nystrom_loss", x, t, _landmarks(x), _landmarks(t)),
}


def _centres(x):
    return torch.linspace(-1, 1, 3 * x.shape[-1], device=x.device).reshape(3, -1).to(x.dtype)


def _landmarks(x):
    return torch.linspace(-0.5, 0.5, 4 * x.shape[-1], device=x.device).reshape(4, -1).to(x.dtype)


def _inputs(backend, rows=6, classes=40, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, classes, generator=generator) * 3).to(backend.device, dtype)
    teacher = (torch.randn(rows, classes, generator=generator) * 3).to(backend.device, dtype)
    target = torch.randint(0, classes, (rows,), generator=generator).to(backend.device)
    target[1] = -100
    return student, teacher, target


@pytest.mark.parametrize("scale", [65536.0, 32768.0])
def test_fp16_loss_scale_applied_before_the_rounding(backend, scale):
    """(loss · GradScaler's scale).backward() in fp16: finite, no entry flushed to zero that the
    reference keeps, and equal to the reference's fp16 gradient up to fp16 rounding."""
    rows, classes = backend.pick((256, 2000), (4, 300))
    student, teacher, target = _inputs(backend, rows, classes, torch.float16)
    grads = {}
    for name in ("reference", backend.name):
        x = student.clone().requires_grad_()
        (kdfast.kd_loss(x, teacher, target, alpha=0.5, backend=name) * scale).backward()
        grads[name] = x.grad
    got, expected = grads[backend.name].float(), grads["reference"].float()
    assert got.isfinite().all()
    assert int((got == 0).sum()) <= int((expected == 0).sum()), "entries flushed to zero before the scale"
    assert ((got - expected).abs() <= 2e-3 * expected.abs() + 1e-7 * scale).all()


def test_fp16_grad_scaler_training_matches_reference(backend):
    """A few SGD steps of a linear student through torch.amp.GradScaler (default scale) in fp16."""
    features, classes = backend.pick((64, 500), (16, 50))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, features, generator=generator).to(backend.device, torch.float16)
    teacher = (torch.randn(32, classes, generator=generator) * 2).to(backend.device, torch.float16)
    target = torch.randint(0, classes, (32,), generator=generator).to(backend.device)
    weights = {}
    for name in ("reference", backend.name):
        weight = (torch.randn(classes, features, generator=torch.Generator().manual_seed(2)) * 0.1).to(
            backend.device, torch.float16).requires_grad_()
        optimizer = torch.optim.SGD([weight], lr=0.5)
        scaler = torch.amp.GradScaler(backend.device, init_scale=65536.0, enabled=backend.device == "cuda")
        for _ in range(3):
            optimizer.zero_grad()
            loss = kdfast.kd_loss(inputs @ weight.T, teacher, target, alpha=0.5, backend=name)
            if scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:  # GradScaler needs a CUDA device: its arithmetic by hand
                (loss * 65536.0).backward()
                weight.grad.div_(65536.0)
                optimizer.step()
        weights[name] = weight.detach().float()
    torch.testing.assert_close(weights[backend.name], weights["reference"], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_retain_graph_zero_grad_and_a_second_backward(backend, family):
    student, teacher, target = _inputs(backend)
    x = student.clone().requires_grad_()
    loss = FAMILIES[family](backend, x, teacher, target)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad.zero_()  # optimizer.zero_grad(set_to_none=False)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)
    x.grad.mul_(0.25)  # in-place clipping / scaling of .grad
    x.grad = None
    loss.backward()
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_autograd_grad_twice(backend, family):
    student, teacher, target = _inputs(backend)
    x = student.clone().requires_grad_()
    loss = FAMILIES[family](backend, x, teacher, target)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    first_copy = first.clone()
    first.mul_(3.0)  # the caller owns what it got
    (second,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(second, first_copy, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_second_derivatives_raise_a_clear_error(backend, family):
    if backend.name == "reference":
        pytest.skip("the reference is plain autograd: it has second derivatives")
    student, teacher, target = _inputs(backend, dtype=torch.float64)
    x = student.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(FAMILIES[family](backend, x, teacher, target), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        gradient.pow(2).sum().backward()
    assert "backend='reference'" in SECOND_DERIVATIVE_ERROR


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_evaluation_computes_the_loss_only(backend, family, mode):
    """The same value as a training forward, and (CPU tensors) no allocation of the gradient's size."""
    student, teacher, target = _inputs(backend, rows=backend.pick(64, 6), classes=backend.pick(2048, 40))
    expected = FAMILIES[family](backend, student.clone().requires_grad_(), teacher, target).detach()

    def evaluate():
        if mode == "no_grad":
            with torch.no_grad():
                return FAMILIES[family](backend, student, teacher, target)
        if mode == "inference_mode":
            with torch.inference_mode():
                return FAMILIES[family](backend, student, teacher, target)
        return FAMILIES[family](backend, student, teacher, target)

    loss = evaluate()
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected)
    if backend.device != "cpu" or backend.name == "reference":
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        evaluate()
    gradient_bytes = student.numel() * student.element_size()
    big = [event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage >= gradient_bytes]
    assert not big, f"an allocation of the gradient's size under {mode}: {big}"


@pytest.mark.parametrize("kind", ["fro", "smooth_l1"])
def test_nystrom_fp16_gradient_is_not_flushed(backend, kind):
    """kind="fro" in fp16 gave an all-zero gradient (its small per-row upstream factor multiplied an
    fp16 gradient): now fp16 gradients are kept in fp32 until that factor is applied."""
    generator = torch.Generator().manual_seed(3)
    # Gram entries ~1e3, so the fro chain rule's factor 1/(2‖R‖_F·‖S^t‖_F) ~ 1e-11 is below fp16's range
    fs, ft = ((4 * torch.randn(256, 64, generator=generator)).to(backend.device, torch.float16) for _ in range(2))
    cs, ct = ((4 * torch.randn(64, 64, generator=generator)).to(backend.device, torch.float16) for _ in range(2))
    grads = {}
    for name in ("reference", backend.name):
        x = fs.clone().requires_grad_()
        kdfast.nystrom_loss(x, ft, cs, ct, kind=kind, backend=name).backward()
        grads[name] = x.grad.float()
    expected = grads["reference"]
    assert torch.count_nonzero(grads[backend.name]) == torch.count_nonzero(expected) > 0
    torch.testing.assert_close(grads[backend.name], expected, rtol=5e-3, atol=1e-3 * expected.abs().max().item())
