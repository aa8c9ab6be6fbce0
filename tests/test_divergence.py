"""The LLM divergences (``divergence_loss``: forward / reverse / mixed KL, generalized JSD(β), TVD,
skew KL and skew reverse KL) on every backend (tests/backends.py) against the float64 reference:
values and gradients in every dtype and reduction, ``num_items_in_batch``, α·CE, T² scaling, the
logit transforms, odd shapes, the streamed Triton path, masked (−inf) vocabularies as the spec's
table says (+inf for a support violation, never NaN), NaN and ignored rows, upstream gradients ≠ 1,
and the spec's invariants on each backend's own outputs (kd_loss = forward KL with T², zero at
z^s = z^t + c, gradient rows summing to 0, JSD's endpoints).

The reference itself is held against an independent float64 implementation in
test_divergence_reference.py; here it is the truth."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import kdfast

from backends import BF16, DTYPES, F16, F32, F64, assert_matches, assert_nan_rows_whole, compare, run

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

#: (divergence, its weight options): every form, the weighted ones at an inner weight
FORMS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("mixed_kl", dict(mixed_kl_weight=0.3)),
    ("jsd", dict(beta=0.5)),
    ("jsd", dict(beta=0.1)),
    ("tvd", {}),
    ("skew_forward_kl", dict(skew_alpha=0.1)),
    ("skew_reverse_kl", dict(skew_alpha=0.3)),
]
FORM_PARAMS = [pytest.param(form, id=form[0] + "".join(f"-{v}" for v in form[1].values())) for form in FORMS]
DTYPE_PARAMS = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in DTYPES]
REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def inputs(shape, dtype, backend, *, spread=2.0, ignore_some=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator, dtype=F64) * spread).to(dtype)
    teacher = (torch.randn(shape, generator=generator, dtype=F64) * spread).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    if ignore_some and target.numel() > 1:
        target.view(-1)[1] = -100
    return student.to(backend.device), teacher.to(backend.device), target.to(backend.device)


def check(backend, form, student, teacher, target=None, **options):
    divergence, weights = form
    extra = (target,) if target is not None else ()
    return compare(backend, "divergence_loss", student, teacher, *extra, divergence=divergence,
                   **{**weights, **options})


# --- values and gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("form", FORM_PARAMS)
def test_forms_dtypes(backend, form, dtype):
    student, teacher, target = inputs(backend.pick((6, 1001), (3, 257)), dtype, backend)
    check(backend, form, student, teacher, target, reduction="sum", temperature=2.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", FORM_PARAMS)
def test_reductions_with_ce_and_t2_float64(backend, form, reduction):
    student, teacher, target = inputs((5, 37), F64, backend)
    check(backend, form, student, teacher, target, reduction=reduction, alpha=0.6, temperature=1.5,
          t2_scaling=True)


@pytest.mark.parametrize("num_items", [pytest.param(7, id="int"), pytest.param(2.5, id="float"),
                                       pytest.param("tensor", id="tensor")])
@pytest.mark.parametrize("form", [FORM_PARAMS[0], FORM_PARAMS[3]])
def test_num_items_in_batch(backend, form, num_items):
    student, teacher, target = inputs((5, 37), F32, backend)
    if num_items == "tensor":
        num_items = torch.tensor(11, device=backend.device)
    check(backend, form, student, teacher, target, num_items_in_batch=num_items, alpha=0.5)


@pytest.mark.parametrize("rows", [0, 1, 3])
@pytest.mark.parametrize("classes", [1, 7, 1001])
@pytest.mark.parametrize("form", FORM_PARAMS)
def test_odd_shapes(backend, form, rows, classes):
    student, teacher, target = inputs((rows, classes), F64, backend)
    check(backend, form, student, teacher, target, reduction="batchmean")


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(BF16, id="bfloat16")])
@pytest.mark.parametrize("form", FORM_PARAMS)
def test_streamed_path(triton_streamed, form, dtype):
    """A 16-column block forces the multi-pass online path (C = 100: seven blocks, a ragged last)."""
    student, teacher, target = inputs((3, 100), dtype, triton_streamed)
    check(triton_streamed, form, student, teacher, target, reduction="sum", alpha=0.7)


@pytest.mark.parametrize("form", FORM_PARAMS)
def test_wide_logit_range_float32(backend, form):
    """Logits spread over hundreds of units: most probabilities underflow fp32 (p = 0 from a finite
    logit is treated as a masked entry, as in the reference)."""
    student, teacher, target = inputs(backend.pick((4, 515), (3, 515)), F32, backend, spread=60.0)
    check(backend, form, student, teacher, target, reduction="sum")


@pytest.mark.parametrize("form", FORM_PARAMS)
def test_upstream_gradient_per_row(backend, form):
    student, teacher, target = inputs((2, 3, 29), F32, backend)
    upstream = torch.linspace(-2.0, 3.0, 6).reshape(2, 3)
    check(backend, form, student, teacher, target, reduction="none", upstream=upstream, temperature=3.0)


@pytest.mark.parametrize("transform", [dict(student_logit_scale=0.7, teacher_logit_scale=1.3),
                                       dict(student_softcap=5.0, teacher_softcap=3.0),
                                       dict(student_logit_scale=2.0, student_softcap=4.0, teacher_softcap=30.0)],
                         ids=["scale", "softcap", "both"])
@pytest.mark.parametrize("form", [FORM_PARAMS[0], FORM_PARAMS[1], FORM_PARAMS[3]])
def test_logit_transforms(backend, form, transform):
    student, teacher, target = inputs((4, 53), F32, backend, spread=6.0)
    check(backend, form, student, teacher, target, alpha=0.8, temperature=2.0, **transform)


def test_float64_gradcheck(backend):
    """The backend's gradient against central differences, not only against the reference."""
    student, teacher, target = inputs((3, 9), F64, backend)
    for divergence, weights in FORMS:
        if divergence == "tvd":
            continue  # not differentiable where p = q; the reference's subgradient is checked above
        loss = functools.partial(kdfast.divergence_loss, backend=backend.name, divergence=divergence, alpha=0.7,
                                 temperature=2.0, **weights)
        x = student.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda s: loss(s, teacher, target), (x,), eps=1e-6, atol=1e-7), divergence


# --- special values -------------------------------------------------------------------------------


def masked_inputs(backend, dtype=F32):
    student, teacher, target = inputs((6, 40), dtype, backend)
    teacher[0, 30:] = -math.inf                     # teacher-masked tail (finite forward KL)
    student[1, 30:] = -math.inf                     # student-masked tail (finite reverse KL)
    teacher[2, 25:] = -math.inf                     # both masked on the same columns
    student[2, 25:] = -math.inf
    teacher[3, :] = torch.finfo(dtype).min          # finfo.min mask entries
    teacher[3, :10] = 1.0
    student[4, 5] = -math.inf                       # one column each side, different columns
    teacher[4, 7] = -math.inf
    target[:] = 0                                   # labels on a column both sides keep finite
    return student, teacher, target


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(BF16, id="bfloat16"),
                                   pytest.param(F64, id="float64")])
@pytest.mark.parametrize("form", FORM_PARAMS)
def test_masked_vocabulary(backend, form, dtype):
    """Finite values or +inf exactly where the reference has them, never a NaN."""
    student, teacher, target = masked_inputs(backend, dtype)
    (loss, grad), _ = check(backend, form, student, teacher, target, reduction="none", temperature=1.5)
    assert not loss.isnan().any(), f"{form}: NaN loss rows {loss.isnan().nonzero().flatten().tolist()}"
    finite_rows = torch.isfinite(loss)
    assert not grad[finite_rows].isnan().any(), f"{form}: NaN in the gradient of a finite row"


@pytest.mark.parametrize("form", FORM_PARAMS)
def test_column_masked_on_both_sides_changes_nothing(backend, form):
    student, teacher, target = inputs((4, 31), F64, backend)
    masked_s, masked_t = student.clone(), teacher.clone()
    masked_s[:, 13], masked_t[:, 13] = -math.inf, -math.inf
    target[target == 13] = 0
    options = dict(divergence=form[0], reduction="none", temperature=2.0, **form[1])
    loss, grad = run(functools.partial(kdfast.divergence_loss, backend=backend.name), student[:, torch.arange(31) != 13],
                     teacher[:, torch.arange(31) != 13], **options)
    masked_loss, masked_grad = run(functools.partial(kdfast.divergence_loss, backend=backend.name), masked_s, masked_t,
                                   **options)
    assert torch.allclose(masked_loss, loss, rtol=1e-10, atol=1e-12)
    assert torch.equal(masked_grad[:, 13], torch.zeros_like(masked_grad[:, 13]))
    assert torch.allclose(masked_grad[:, torch.arange(31) != 13], grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", FORM_PARAMS)
def test_nan_rows_and_ignored_rows(backend, form):
    """A NaN anywhere in a row: that row's loss and whole gradient row NaN; an ignored row holding
    NaN: loss 0 and a zero gradient row; the other rows untouched."""
    student, teacher, target = inputs((5, 23), F32, backend, ignore_some=False)
    student[1, 4] = math.nan
    teacher[2, 9] = math.nan
    student[3, 0] = math.nan
    target[3] = -100
    (loss, grad), _ = check(backend, form, student, teacher, target, reduction="none", alpha=0.9)
    assert_nan_rows_whole(loss, grad, form[0])
    assert loss[3] == 0 and torch.equal(grad[3], torch.zeros_like(grad[3]))


# --- invariants on each backend's own outputs -----------------------------------------------------


def test_kd_loss_is_forward_kl_with_t2(backend):
    student, teacher, target = inputs((4, 33), F64, backend)
    for reduction in REDUCTIONS:
        kd = run(functools.partial(kdfast.kd_loss, backend=backend.name), student, teacher, target,
                 temperature=3.0, alpha=0.4, reduction=reduction)
        div = run(functools.partial(kdfast.divergence_loss, backend=backend.name), student, teacher, target,
                  divergence="forward_kl", temperature=3.0, alpha=0.4, t2_scaling=True, reduction=reduction)
        for a, b in zip(kd, div):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), reduction


@pytest.mark.parametrize("form", FORM_PARAMS)
def test_zero_at_shifted_teacher_and_rows_sum_to_zero(backend, form):
    student, teacher, _ = inputs((4, 33), F64, backend)
    shift = 0.0 if form[0] == "tvd" else 1.75  # TVD's subgradient at a tie is 0 only without a shift
    loss, grad = run(functools.partial(kdfast.divergence_loss, backend=backend.name), student, student + shift,
                     divergence=form[0], reduction="none", temperature=2.0, **form[1])
    assert loss.abs().max() < 1e-12 and grad.abs().max() < 1e-12
    loss, grad = run(functools.partial(kdfast.divergence_loss, backend=backend.name), student, teacher,
                     divergence=form[0], reduction="sum", temperature=2.0, **form[1])
    assert grad.sum(dim=-1).abs().max() < 1e-12


def test_jsd_endpoints_are_the_kls(backend):
    student, teacher, _ = inputs((4, 33), F64, backend)
    call = functools.partial(run, functools.partial(kdfast.divergence_loss, backend=backend.name), student, teacher,
                             reduction="none", temperature=2.0)
    for beta, plain in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        for a, b in zip(call(divergence="jsd", beta=beta), call(divergence=plain)):
            assert torch.equal(a, b), (beta, plain)
    small = 1e-7
    jsd, _ = call(divergence="jsd", beta=small)
    forward, _ = call(divergence="forward_kl")
    assert_matches(jsd / small, forward, (1e-4, 1e-6), "JSD_β/β → forward KL", per_entry=True)


@pytest.mark.parametrize("dtype", [pytest.param(F16, id="float16")])
def test_half_gradient_under_loss_scaling(backend, dtype):
    """fp16 gradients survive GradScaler's 65536 (kept wide until the factor is applied)."""
    student, teacher, _ = inputs((4, 257), dtype, backend)
    x = student.clone().requires_grad_()
    (kdfast.divergence_loss(x, teacher, divergence="jsd", backend=backend.name) * 65536).backward()
    want = run(functools.partial(kdfast.divergence_loss, backend="reference"), student.double(), teacher.double(),
               divergence="jsd")[1] * 65536
    assert torch.isfinite(x.grad).all()
    assert_matches(x.grad, want.to(x.grad.device), (2e-3, 2e-3 * 65536 * 1e-3), "scaled fp16 JSD grad", per_entry=False)
