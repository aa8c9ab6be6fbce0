"""The autograd shared by every fused backend (kdfast.backends._fused): the reduction's scale is
folded into the kernel and the saved gradient is handed out without a copy when the upstream
gradient is 1, so these check that reuse of a graph still gives the right numbers."""
import pytest
import torch

import kdfast

FUSED = [name for name in kdfast.available_backends("kd_loss", "cpu") if name != "reference"]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend can run on CPU tensors here")


def case():
    student = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 11, dtype=torch.float64)
    target = torch.tensor([1, -100, 3, 4, 10])
    return student, teacher, target


def reference_grad(student, teacher, target, scale=1.0):
    loss = kdfast.skd_loss(student, teacher, target, alpha=0.6, backend="reference")
    return torch.autograd.grad(loss * scale, student)[0]


@pytest.mark.parametrize("backend", FUSED)
def test_retain_graph_accumulates_correctly(backend):
    student, teacher, target = case()
    loss = kdfast.skd_loss(student, teacher, target, alpha=0.6, backend=backend)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * reference_grad(student, teacher, target))


@pytest.mark.parametrize("backend", FUSED)
def test_gradients_handed_out_are_not_changed_by_a_later_backward(backend):
    student, teacher, target = case()
    loss = kdfast.skd_loss(student, teacher, target, alpha=0.6, backend=backend)
    first, = torch.autograd.grad(loss, student, retain_graph=True)            # upstream 1: no copy
    kept = first.clone()
    second, = torch.autograd.grad(loss, student, torch.tensor(3.0, dtype=torch.float64), retain_graph=True)
    third, = torch.autograd.grad(loss, student)
    expected = reference_grad(student, teacher, target)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, 3 * expected)
    torch.testing.assert_close(third, expected)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_folded_scale_with_and_without_a_target(backend, reduction):
    student, teacher, target = case()
    for labels in (None, target):
        ours = kdfast.kd_loss(student, teacher, labels, reduction=reduction, backend=backend)
        theirs = kdfast.kd_loss(student, teacher, labels, reduction=reduction, backend="reference")
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(torch.autograd.grad(ours, student)[0], torch.autograd.grad(theirs, student)[0])


class _RecordedShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Shapes of the outputs of every aten op run while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor):
                self.shapes.append((func, tuple(value.shape)))
        return out


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction,normalize", [("sum", True), ("mean", True), ("mean", False)])
def test_nystrom_factor_is_applied_in_the_kernel(backend, reduction, normalize):
    """The mean's divisor and 1/(‖S^t‖_F + eps) reach the gradient inside the kernel (on the B×m
    matrix G), so loss.backward() runs no op over the [B, d] gradient; values match the reference."""
    generator = torch.Generator().manual_seed(3)
    fs = torch.randn(6, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    ft, cs, ct = (torch.randn(shape, dtype=torch.float64, generator=generator) for shape in ((6, 7), (4, 9), (4, 7)))
    options = dict(reduction=reduction, normalize=normalize, kind="smooth_l1", beta=0.5)
    ours = kdfast.nystrom_loss(fs, ft, cs, ct, backend=backend, **options)
    with _RecordedShapes() as recorded:
        grad, = torch.autograd.grad(ours, fs)
    assert not [func for func, shape in recorded.shapes if shape == (6, 9)], recorded.shapes
    theirs = kdfast.nystrom_loss(fs, ft, cs, ct, backend="reference", **options)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad, torch.autograd.grad(theirs, fs)[0])
