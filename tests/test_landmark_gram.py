"""The landmark-Gram family (KDA / Nyström) on every backend (tests/backends.py) against the
float64 reference: values and gradients of every kind and reduction in every dtype, odd shapes,
options, upstream gradients ≠ 1, non-contiguous inputs, the unfused Triton gradient path; NaN and
±inf rows."""
from __future__ import annotations

import functools

import pytest
import torch

from backends import DTYPES, F32, F64, assert_nan_rows_whole, compare, run

DTYPE_PARAMS = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in DTYPES]
KINDS = [("smooth_l1", "sum"), ("smooth_l1", "none"), ("smooth_l1", "mean"), ("sq_fro", "sum"), ("sq_fro", "mean"),
         ("fro", "sum")]


def gram_inputs(rows, ds, dt, landmarks, dtype, backend, seed=0, scale=0.4):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=generator, dtype=F64) * scale
               for shape in ((rows, ds), (rows, dt), (landmarks, ds), (landmarks, dt))]
    return [t.to(dtype).to(backend.device) for t in tensors]


def gram_compare(backend, tensors, upstream=None, **options):
    return compare(backend, "nystrom_loss", *tensors, family="landmark_gram", upstream=upstream, **options)


def _upstream(backend, reduction, rows):
    if reduction == "none":
        return torch.rand(rows, device=backend.device) + 0.5
    return torch.tensor(2.5, device=backend.device)


@pytest.mark.parametrize("kind,reduction", [pytest.param(k, r, id=f"{k}-{r}") for k, r in KINDS])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_nystrom(backend, dtype, kind, reduction):
    tensors = gram_inputs(9, 24, 16, 5, dtype, backend)
    gram_compare(backend, tensors, _upstream(backend, reduction, 9), kind=kind, reduction=reduction)


@pytest.mark.parametrize("kind", ["smooth_l1", "sq_fro", "fro"])
@pytest.mark.parametrize("rows,ds,dt,m", [(1, 1, 3, 1), (3, 7, 5, 10), (20, 40, 24, 33)])
def test_nystrom_odd_shapes(backend, kind, rows, ds, dt, m):
    tensors = gram_inputs(rows, ds, dt, m, F32, backend, scale=1.0)
    reduction = "sum" if kind == "fro" else "mean"
    gram_compare(backend, tensors, _upstream(backend, reduction, rows), kind=kind, reduction=reduction, beta=0.7)


@pytest.mark.parametrize("rows,landmarks", [(0, 3), (1, 1), (4, 0)])
def test_nystrom_empty_shapes_and_options(backend, rows, landmarks):
    tensors = gram_inputs(rows, 6, 5, landmarks, F64, backend)
    gram_compare(backend, tensors, kind="smooth_l1", reduction="sum", normalize=False, beta=0.5)
    gram_compare(backend, tensors, kind="sq_fro", reduction="mean")


@pytest.mark.parametrize("normalize", [True, False])
def test_nystrom_many_landmarks_and_non_contiguous(backend_or_variant, normalize):
    """m = 40 (with the streamed variant at most 16 landmarks per tile: G goes through the fp32
    scratch and the second GEMM kernel); the student features are a transposed view."""
    fs, ft, cs, ct = gram_inputs(17, 18, 9, 40, F32, backend_or_variant, scale=1.0)
    fs = fs.t().contiguous().t()
    assert not fs.is_contiguous()
    gram_compare(backend_or_variant, (fs, ft, cs, ct), _upstream(backend_or_variant, "none", 17), kind="smooth_l1",
                 normalize=normalize, reduction="none")


def test_nystrom_identical_networks_give_zero(backend):
    fs, _, cs, _ = gram_inputs(5, 20, 20, 7, F32, backend)
    loss, grad = run(functools.partial(backend.call, "nystrom_loss"), fs, fs, cs, cs)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("kind", ["smooth_l1", "sq_fro"])
@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(F64, id="float64")])
def test_nystrom_nan_and_inf_rows(backend_or_variant, dtype, kind):
    """normalize=False (the scale reads every teacher row): rows 0 student NaN entry, 1 teacher NaN
    entry, 2 student +inf, 3 teacher −inf, 4 control. The NaN/inf pattern of loss and gradient equals
    the reference's, a NaN row's gradient is NaN as a whole, the other rows keep their values."""
    backend = backend_or_variant
    fs, ft, cs, ct = gram_inputs(5, 24, 16, 5, dtype, backend)
    fs[0, 5] = float("nan")
    ft[1, 7] = float("nan")
    fs[2, 3] = float("inf")
    ft[3, 3] = float("-inf")
    (loss, grad), (ref_loss, ref_grad) = gram_compare(backend, (fs, ft, cs, ct), kind=kind, normalize=False,
                                                      reduction="none", upstream=_upstream(backend, "none", 5))
    assert_nan_rows_whole(loss, grad, "nystrom_loss")
    assert ref_loss[:2].isnan().all() and ref_grad[:2].isnan().all(), "the reference's own rule"
    assert torch.isfinite(loss[4]) and torch.isfinite(grad[4]).all(), "the control row"


@pytest.mark.parametrize("kind,reduction", [("smooth_l1", "none"), ("smooth_l1", "sum"), ("fro", "sum")])
def test_nystrom_nan_with_whole_batch_normalisation(backend_or_variant, kind, reduction):
    """With normalize=True the scale 1/‖S^t‖ reads every teacher row: a NaN teacher row makes every
    row NaN, loss and gradient, as in the reference; a NaN student row poisons only itself (and
    the ``fro`` norm, one number for the batch)."""
    backend = backend_or_variant
    fs, ft, cs, ct = gram_inputs(4, 24, 16, 5, F32, backend)
    student_nan = fs.clone()
    student_nan[1, 2] = float("nan")
    (loss, grad), _ = gram_compare(backend, (student_nan, ft, cs, ct), kind=kind, reduction=reduction,
                                   upstream=_upstream(backend, reduction, 4))
    if reduction == "none":
        assert_nan_rows_whole(loss, grad, "nystrom_loss")
    teacher_nan = ft.clone()
    teacher_nan[2, 0] = float("nan")
    (loss, grad), _ = gram_compare(backend, (fs, teacher_nan, cs, ct), kind=kind, reduction=reduction,
                                   upstream=_upstream(backend, reduction, 4))
    assert loss.isnan().all() and grad.isnan().all()
