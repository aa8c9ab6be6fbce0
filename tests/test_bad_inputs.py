"""Bad input gets a clear error naming the argument; edge cases get their defined result.

Runs through the public API with whatever backend "auto" picks on CPU, and with the reference.
"""
import math

import pytest
import torch

import kdfast

B, C = 4, 6


def row_inputs(dtype=torch.float32):
    return torch.randn(B, C, dtype=dtype), torch.randn(B, C, dtype=dtype), torch.randint(0, C, (B,))


def row_call(name, student, teacher, target, **options):
    if name == "label_smoothing_loss":
        return kdfast.label_smoothing_loss(student, target, **options)
    return getattr(kdfast, name)(student, teacher, target, **options)


ROW_LOSSES = ["kd_loss", "skd_loss", "partial_teacher_loss", "label_smoothing_loss", "reweighted_ce_loss"]
TEACHER_LOSSES = [name for name in ROW_LOSSES if name != "label_smoothing_loss"]


@pytest.mark.parametrize("name", TEACHER_LOSSES)
def test_row_shape_dtype_device_mismatch(name):
    s, t, y = row_inputs()
    with pytest.raises(ValueError, match="teacher_logits"):
        row_call(name, s, torch.randn(B, C + 1), y)
    with pytest.raises(TypeError, match="teacher_logits"):
        row_call(name, s, t.double(), y)
    with pytest.raises(ValueError, match="teacher_logits"):
        row_call(name, s, t.to("meta"), y)
    with pytest.raises(TypeError, match="student_logits"):
        row_call(name, s.long(), t.long(), y)


@pytest.mark.parametrize("name", ROW_LOSSES)
def test_row_bad_labels(name):
    s, t, _ = row_inputs()
    for bad in (C, -1, 10**6):
        y = torch.tensor([0, 1, bad, 2])
        with pytest.raises(ValueError, match=rf"target .*found {bad}"):
            row_call(name, s, t, y)
    with pytest.raises(ValueError, match="target"):
        row_call(name, s, t, torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="target"):
        row_call(name, s, t, torch.zeros(B))
    with pytest.raises(ValueError, match="target"):
        row_call(name, s, t, torch.zeros(B, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("name", ROW_LOSSES)
def test_row_bad_options(name):
    s, t, y = row_inputs()
    with pytest.raises(ValueError, match="reduction"):
        row_call(name, s, t, y, reduction="average")
    with pytest.raises(ValueError, match="backend"):
        row_call(name, s, t, y, backend="fortran")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        row_call(name, s, t, y, backend="cuda")  # CPU tensors: the CUDA backend cannot take them
    with pytest.raises(ValueError, match="student_logits"):
        row_call(name, torch.randn(B, 0), torch.randn(B, 0), y)


@pytest.mark.parametrize("name", ["kd_loss", "skd_loss", "partial_teacher_loss", "reweighted_ce_loss"])
@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_non_positive_temperature(name, temperature):
    s, t, y = row_inputs()
    with pytest.raises(ValueError, match="temperature"):
        row_call(name, s, t, y, temperature=temperature)


def test_option_errors_name_the_option():
    s, t, y = row_inputs()
    with pytest.raises(ValueError, match="alpha"):
        kdfast.kd_loss(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="target is required when alpha < 1"):
        kdfast.kd_loss(s, t, alpha=0.5)
    with pytest.raises(ValueError, match="normalize"):
        kdfast.skd_loss(s, t, normalize="rms")
    with pytest.raises(ValueError, match="multiplier"):
        kdfast.skd_loss(s, t, multiplier=0.0)
    with pytest.raises(ValueError, match="eps"):
        kdfast.skd_loss(s, t, eps=-1e-7)
    with pytest.raises(ValueError, match="smoothing"):
        kdfast.label_smoothing_loss(s, y, smoothing=1.5)
    with pytest.raises(ValueError, match="target is required"):
        kdfast.partial_teacher_loss(s, t, None)
    with pytest.raises(TypeError, match="temperature"):
        kdfast.kd_loss(s, t, temperature=torch.tensor(2.0))


def test_nd_errors():
    u, ft, y, centres = torch.randn(B, 5), torch.randn(B, 5), torch.randint(0, 3, (B,)), torch.randn(3, 5)
    with pytest.raises(ValueError, match="teacher_features"):
        kdfast.nd_loss(u, torch.randn(B, 4), y, centres)
    with pytest.raises(ValueError, match="centers"):
        kdfast.nd_loss(u, ft, y, torch.randn(3, 4))
    with pytest.raises(TypeError, match="centers"):
        kdfast.nd_loss(u, ft, y, centres.double())
    with pytest.raises(ValueError, match=r"target .*found 3"):
        kdfast.nd_loss(u, ft, torch.tensor([0, 1, 2, 3]), centres)
    with pytest.raises(ValueError, match="reduction"):
        kdfast.nd_loss(u, ft, y, centres, reduction="batchmean ")
    with pytest.raises(ValueError, match="student_features"):
        kdfast.nd_loss(u[0], ft[0], y[:1], centres)


def test_nystrom_errors():
    fs, ft, cs, ct = torch.randn(B, 5), torch.randn(B, 3), torch.randn(7, 5), torch.randn(7, 3)
    with pytest.raises(ValueError, match="teacher_landmarks"):
        kdfast.nystrom_loss(fs, ft, cs, torch.randn(6, 3))
    with pytest.raises(ValueError, match="student_landmarks"):
        kdfast.nystrom_loss(fs, ft, torch.randn(7, 4), ct)
    with pytest.raises(ValueError, match="teacher_features"):
        kdfast.nystrom_loss(fs, torch.randn(B + 1, 3), cs, ct)
    with pytest.raises(ValueError, match="kind"):
        kdfast.nystrom_loss(fs, ft, cs, ct, kind="huber")
    with pytest.raises(ValueError, match="reduction"):
        kdfast.nystrom_loss(fs, ft, cs, ct, kind="fro", reduction="none")
    with pytest.raises(TypeError, match="student_landmarks"):
        kdfast.nystrom_loss(fs, ft, cs.half(), ct)


# ---------------------------------------------------------------------------------------------
# Defined results
# ---------------------------------------------------------------------------------------------

def all_losses():
    """(name, fn(student) -> loss) over every loss and reduction, with every row ignored."""
    s, t, _ = row_inputs()
    ignored = torch.full((B,), -100)
    for name in ROW_LOSSES:
        for reduction in ("none", "sum", "mean", "batchmean"):
            yield f"{name}-{reduction}", (lambda x, n=name, r=reduction: row_call(n, x, t, ignored, reduction=r))
    ft, centres = torch.randn(B, C), torch.randn(3, C)
    for reduction in ("none", "sum", "mean"):
        yield f"nd-{reduction}", (lambda x, r=reduction: kdfast.nd_loss(x, ft, ignored, centres, reduction=r))


@pytest.mark.parametrize("name,loss_fn", list(all_losses()), ids=lambda v: v if isinstance(v, str) else "")
def test_all_rows_ignored_gives_zero_and_zero_gradient(name, loss_fn):
    student = torch.randn(B, C, requires_grad=True)
    loss = loss_fn(student)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("name", ROW_LOSSES)
def test_empty_batch(name, reduction):
    student = torch.randn(0, C, requires_grad=True)
    loss = row_call(name, student, torch.randn(0, C), torch.zeros(0, dtype=torch.long), reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert student.grad.shape == (0, C)


def test_empty_batch_features():
    u = torch.randn(0, 5, requires_grad=True)
    empty_target = torch.zeros(0, dtype=torch.long)
    assert kdfast.nd_loss(u, torch.randn(0, 5), empty_target, torch.randn(3, 5)).item() == 0.0
    loss = kdfast.nystrom_loss(u, torch.randn(0, 3), torch.randn(4, 5), torch.randn(4, 3), reduction="mean")
    loss.backward()
    assert loss.item() == 0.0 and u.grad.shape == (0, 5)


@pytest.mark.parametrize("name", ROW_LOSSES)
def test_non_contiguous_inputs(name):
    wide_s, wide_t = torch.randn(C, 2 * B, dtype=torch.float64), torch.randn(C, 2 * B, dtype=torch.float64)
    s, t = wide_s.T[::2], wide_t.T[::2]   # transposed and strided
    assert not s.is_contiguous()
    y = torch.randint(0, C, (2 * B,))[::2]
    torch.testing.assert_close(row_call(name, s, t, y, reduction="none"),
                               row_call(name, s.contiguous(), t.contiguous(), y.contiguous(), reduction="none"))


def test_non_contiguous_features():
    u, ft = torch.randn(5, 2 * B, dtype=torch.float64).T[::2], torch.randn(5, 2 * B, dtype=torch.float64).T[::2]
    y, centres = torch.randint(0, 3, (B,)), torch.randn(5, 3, dtype=torch.float64).T
    torch.testing.assert_close(kdfast.nd_loss(u, ft, y, centres), kdfast.nd_loss(u.contiguous(), ft.contiguous(), y,
                                                                                 centres.contiguous()))
    cs, ct = torch.randn(5, 4, dtype=torch.float64).T, torch.randn(5, 4, dtype=torch.float64).T
    torch.testing.assert_close(kdfast.nystrom_loss(u, ft, cs, ct),
                               kdfast.nystrom_loss(u.contiguous(), ft.contiguous(), cs.contiguous(), ct.contiguous()))


def test_half_precision_inputs_return_float32_loss_and_input_dtype_gradient():
    for dtype in (torch.float16, torch.bfloat16):
        s, t, y = row_inputs(dtype)
        s.requires_grad_()
        loss = kdfast.skd_loss(s, t, y, alpha=0.5)
        loss.backward()
        assert loss.dtype == torch.float32 and s.grad.dtype == dtype and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ROW_LOSSES)
def test_ignore_index_out_of_the_label_range_or_not_an_int_names_it(name):
    s, t, y = row_inputs()
    with pytest.raises(ValueError, match="ignore_index"):
        row_call(name, s, t, y, ignore_index=2**70)
    with pytest.raises(TypeError, match="ignore_index"):
        row_call(name, s, t, y, ignore_index="x")
    if name in ("kd_loss", "skd_loss"):  # checked without a target too
        with pytest.raises(ValueError, match="ignore_index"):
            row_call(name, s, t, None, ignore_index=-(2**64))


def test_nd_ignore_index_out_of_range_names_it():
    f, y = torch.randn(B, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="ignore_index"):
        kdfast.nd_loss(f, f, y, torch.randn(2, 3), ignore_index=2**70)
