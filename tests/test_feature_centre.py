"""The feature–centre family (ND loss) on every backend (tests/backends.py) against the float64
reference: values and gradients in every dtype and reduction, odd shapes, both branches and the
tie, ignored rows, upstream gradients ≠ 1, non-contiguous inputs, the two-pass Triton path; NaN
and ±inf rows, ignored rows holding NaN, labels of other dtypes and strides."""
from __future__ import annotations

import functools

import pytest
import torch

import kdfast

from backends import DTYPES, F32, F64, assert_matches, assert_nan_rows_whole, compare, f64, run

DTYPE_PARAMS = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in DTYPES]


def nd_inputs(rows, dim, classes, dtype, backend, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, dim, generator=generator, dtype=F64)
    teacher = torch.randn(rows, dim, generator=generator, dtype=F64)
    teacher[::2] *= 3  # both branches: ‖u‖ < ‖f^t‖ on even rows, mostly > on odd ones
    teacher[1::2] *= 0.3
    centres = torch.randn(classes, dim, generator=generator, dtype=F64)
    target = torch.randint(0, classes, (rows,), generator=generator)
    return [t.to(backend.device) for t in (u.to(dtype), teacher.to(dtype), target, centres.to(dtype))]


def nd_compare(backend, u, teacher, target, centres, upstream=None, **options):
    return compare(backend, "nd_loss", u, teacher, target, centres, family="feature_centre", upstream=upstream,
                   **options)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_nd(backend, dtype, reduction):
    u, teacher, target, centres = nd_inputs(7, 45, 5, dtype, backend)
    target[3] = -100
    upstream = torch.randn(7, device=backend.device) if reduction == "none" else torch.tensor(2.5,
                                                                                             device=backend.device)
    nd_compare(backend, u, teacher, target, centres, upstream, reduction=reduction)


@pytest.mark.parametrize("rows,dim,classes", [(0, 8, 4), (1, 1, 1), (3, 17, 4), (8, 300, 10), (2, 2048, 4)])
def test_nd_shapes(backend, rows, dim, classes):
    if dim > 1000 and not backend.fast:
        pytest.skip("too wide for the Triton interpreter")
    nd_compare(backend, *nd_inputs(rows, dim, classes, F64, backend))


def test_nd_tie_zero_and_all_ignored(backend_or_variant):
    backend = backend_or_variant
    u, teacher, target, centres = nd_inputs(4, 40, 3, F64, backend)
    teacher[0] = u[0].flip(0)     # ‖u‖ = ‖f^t‖ exactly: the cosine branch
    u[1] = 0.0                    # zero student row, smaller than the teacher's
    u[2] = 0.0
    teacher[2] = 0.0              # both zero: the eps clamp
    centres[target[3]] = 0.0      # zero centre: eps clamp on the centre norm
    nd_compare(backend, u, teacher, target, centres, reduction="sum")
    loss, grad = run(functools.partial(backend.call, "nd_loss"), u, teacher,
                     torch.full((4,), -100, device=backend.device), centres)
    assert loss.item() == 0 and torch.count_nonzero(grad) == 0


def test_nd_branches(backend_or_variant):
    """Row 0: ‖u‖ > ‖f^t‖ (cosine, gradient ⟂ u); row 1: ‖u‖ < ‖f^t‖ (gradient −ê/‖f^t‖); row 2: a
    tie, which takes the cosine branch; row 3 ignored. d = 50 (a 16-wide block: the two-pass path)."""
    backend = backend_or_variant
    u, _, _, centres = nd_inputs(4, 50, 3, F32, backend)
    teacher = torch.stack([u[0] * 0.5, u[1] * 3.0, u[2], u[3]])
    target = torch.tensor([0, 1, 2, -100], device=backend.device)
    (_, grad), _ = nd_compare(backend, u, teacher, target, centres, reduction="none")
    grad, u = grad.double(), u.double()
    assert abs((grad[0] @ u[0]).item()) < 1e-5 * grad[0].norm().item() * u[0].norm().item()
    assert abs((grad[2] @ u[2]).item()) < 1e-5 * grad[2].norm().item() * u[2].norm().item()
    unit = centres[1].double() / centres[1].double().norm()
    torch.testing.assert_close(grad[1], -unit / teacher[1].double().norm(), atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(grad[3]) == 0


def test_nd_non_contiguous_and_gradcheck(backend):
    u = torch.randn(6, 3, device=backend.device, dtype=F64).t()
    teacher = torch.randn(3, 12, device=backend.device, dtype=F64)[:, ::2]
    centres = torch.randn(4, 12, device=backend.device, dtype=F64)[:, 1::2]
    target = torch.tensor([0, 3, 1], device=backend.device)
    nd_compare(backend, u, teacher, target, centres, upstream=torch.tensor(1.7, device=backend.device))
    fn = lambda z: backend.call("nd_loss", z, teacher, target, centres)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (u.detach().requires_grad_(True),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(F64, id="float64")])
def test_nd_nan_and_inf_rows(backend_or_variant, dtype):
    """Rows: 0 student NaN entry, 1 teacher NaN entry, 2 student +inf, 3 teacher +inf, 4 ignored
    holding NaN, 5 student −inf, 6 control. The NaN/inf pattern of loss and gradient equals the
    reference's, a NaN row's gradient is NaN as a whole, the other rows keep their values."""
    backend = backend_or_variant
    u, teacher, target, centres = nd_inputs(7, 40, 5, dtype, backend)
    u[0, 5] = float("nan")
    teacher[1, 7] = float("nan")
    u[2, 3] = float("inf")
    teacher[3, 3] = float("inf")
    u[4], teacher[4] = float("nan"), float("nan")
    target[4] = -100
    u[5, 9] = float("-inf")
    (loss, grad), (ref_loss, ref_grad) = nd_compare(backend, u, teacher, target, centres, reduction="none",
                                                    upstream=torch.linspace(0.5, 2.0, 7, device=backend.device))
    assert_nan_rows_whole(loss, grad, "nd_loss")
    assert ref_loss[:2].isnan().all() and ref_grad[:2].isnan().all(), "the reference's own rule"
    assert loss[4] == 0 and torch.count_nonzero(grad[4]) == 0, "the ignored row"
    assert torch.isfinite(loss[6]) and torch.isfinite(grad[6]).all(), "the control row"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_nd_ignored_rows_holding_nan_are_absent(backend_or_variant, reduction):
    backend = backend_or_variant
    u, teacher, target, centres = nd_inputs(5, 40, 5, F32, backend)
    u[1], teacher[1] = float("nan"), float("nan")
    u[3, :4], teacher[3, 4:8] = float("inf"), float("-inf")
    target[1] = target[3] = -100
    (loss, grad), _ = nd_compare(backend, u, teacher, target, centres, reduction=reduction,
                                 upstream=torch.tensor(1.7, device=backend.device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[3]) == 0


@pytest.mark.parametrize("layout", ["strided", "int32", "int32-strided"])
def test_nd_label_dtype_and_stride(backend_or_variant, layout):
    backend = backend_or_variant
    u, teacher, target, centres = nd_inputs(6, 40, 5, F32, backend)
    target[2] = -100
    dtype = torch.int32 if "int32" in layout else torch.int64
    if "strided" in layout:
        big = torch.randint(0, 5, (12,), device=backend.device).to(dtype)
        big[::2] = target.to(dtype)
        labels = big[::2]
        assert not labels.is_contiguous()
    else:
        labels = target.to(dtype)
    got = run(functools.partial(backend.call, "nd_loss"), u, teacher, labels, centres, reduction="none")
    want = run(functools.partial(kdfast.nd_loss, backend="reference"), f64(u), f64(teacher), target, f64(centres),
               reduction="none")
    loss_tol, grad_tol = backend.tol(F32, "feature_centre")
    assert_matches(got[0], want[0], loss_tol, "nd loss", per_entry=True)
    assert_matches(got[1], want[1], grad_tol, "nd grad", per_entry=False)


def test_kernel_label_out_of_range_is_an_error(backend):
    if backend.name not in ("cpu", "cuda"):
        pytest.skip("only the compiled kernels check labels themselves (the public ops check them everywhere)")
    module = backend.kernels()
    u, teacher, _, centres = nd_inputs(3, 5, 3, F32, backend)
    with pytest.raises(RuntimeError, match="target"):
        module.feature_centre(u, teacher, torch.tensor([0, 3, 1], device=backend.device), centres, 1e-8)

