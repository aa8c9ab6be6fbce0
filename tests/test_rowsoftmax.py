"""The row-softmax family (KD, SKD, partial teacher, label smoothing, re-weighted CE) on every
backend (tests/backends.py) against the float64 reference: values and gradients in every dtype,
every reduction, odd shapes, ignored rows, upstream gradients ≠ 1, non-contiguous and N-D inputs,
the streamed Triton path; special values (masked −inf / finfo.min vocabularies, ±0.9·finfo.max,
NaN and ±inf rows, ignored rows holding NaN), labels of other dtypes and strides; the spec §8
invariants on the raw kernel outputs."""
from __future__ import annotations

import functools
import inspect

import pytest
import torch

import kdfast
from kdfast import reference

from backends import (BACKENDS, BACKENDS_AND_VARIANTS, BF16, DTYPES, F16, F32, F64, assert_matches,
                      assert_nan_rows_whole, compare, f64, run)

#: C = 1 with a partial teacher takes log(0) = −inf on purpose; the interpreter's numpy says so
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

# (loss, options)
CASES = [
    ("kd_loss", dict()),
    ("kd_loss", dict(alpha=0.3, temperature=2.0)),
    ("kd_loss", dict(alpha=0.5, temperature=1.0)),
    ("skd_loss", dict()),
    ("skd_loss", dict(alpha=0.4, normalize="layernorm")),
    ("skd_loss", dict(alpha=0.4, normalize="l2", multiplier=3.0)),
    ("skd_loss", dict(alpha=0.7, normalize="standardize", multiplier=1.0, temperature=2.0)),
    ("partial_teacher_loss", dict()),
    ("partial_teacher_loss", dict(alpha=1.0, temperature=3.0)),
    ("label_smoothing_loss", dict(smoothing=0.2)),
    ("reweighted_ce_loss", dict()),
    ("reweighted_ce_loss", dict(alpha=0.9, temperature=2.0)),
]
IDS = [f"{name.removesuffix('_loss')}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'default'}"
       for name, options in CASES]
ROW_CASES = [pytest.param(case, id=case_id) for case, case_id in zip(CASES, IDS)]
REDUCTIONS = ["none", "sum", "mean", "batchmean"]
DTYPE_PARAMS = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in DTYPES]
HAS_TEMPERATURE = {"kd_loss", "skd_loss", "partial_teacher_loss", "reweighted_ce_loss"}


def inputs(shape, dtype, backend, *, spread=3.0, ignore_some=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator, dtype=F64) * spread).to(dtype)
    teacher = (torch.randn(shape, generator=generator, dtype=F64) * spread).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    if ignore_some and target.numel() > 1:
        target.view(-1)[1] = -100
    return student.to(backend.device), teacher.to(backend.device), target.to(backend.device)


def args(name, teacher, target):
    """The positional arguments after the student logits."""
    return ([] if name == "label_smoothing_loss" else [teacher]) + ([] if target is None else [target])


def check(backend, case, student, teacher, target, upstream=None, **extra):
    name, options = case
    return compare(backend, name, student, *args(name, teacher, target), upstream=upstream, **{**options, **extra})


# --- values and gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ROW_CASES)
def test_reductions_float64(backend, case, reduction):
    student, teacher, target = inputs((5, 37), F64, backend)
    check(backend, case, student, teacher, target, reduction=reduction)


@pytest.mark.parametrize("num_items", [pytest.param(13, id="int"), pytest.param("tensor", id="tensor")])
@pytest.mark.parametrize("case", ROW_CASES)
def test_num_items_in_batch(backend, case, num_items):
    """Hugging Face's gradient-accumulation divisor replaces batchmean's count of rows."""
    student, teacher, target = inputs((5, 37), F64, backend)
    if num_items == "tensor":
        num_items = torch.tensor(6.5, dtype=F64, device=backend.device)
    check(backend, case, student, teacher, target, reduction="batchmean", num_items_in_batch=num_items)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", ROW_CASES)
def test_dtypes(backend, case, dtype):
    student, teacher, target = inputs(backend.pick((6, 1001), (3, 1001)), dtype, backend)
    check(backend, case, student, teacher, target, reduction="sum")


@pytest.mark.parametrize("rows", [0, 1, 3])
@pytest.mark.parametrize("classes", [1, 7, 1001])
@pytest.mark.parametrize("case", ROW_CASES)
def test_odd_shapes(backend, case, rows, classes):
    student, teacher, target = inputs((rows, classes), F64, backend)
    check(backend, case, student, teacher, target, reduction="batchmean")


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(BF16, id="bfloat16")])
@pytest.mark.parametrize("case", ROW_CASES)
def test_streamed_path(triton_streamed, case, dtype):
    """A 16-column block forces the multi-pass online path (C = 100: seven blocks, a ragged last)."""
    student, teacher, target = inputs((3, 100), dtype, triton_streamed)
    check(triton_streamed, case, student, teacher, target, reduction="sum")


@pytest.mark.parametrize("case", ROW_CASES)
def test_wide_logit_range_float32(backend, case):
    """Logits spread over hundreds of units at T = 1: most exps underflow fp32 and the rest must
    still match the float64 reference."""
    student, teacher, target = inputs(backend.pick((4, 515), (3, 515)), F32, backend, spread=80.0)
    extra = dict(temperature=1.0) if case[0] in HAS_TEMPERATURE else {}
    check(backend, case, student, teacher, target, reduction="sum", **extra)


@pytest.mark.parametrize("classes", [8001, 8])
def test_softmax_tail_entries_keep_their_relative_precision(backend, classes):
    """Every softmax entry, not only the large ones, to within a few ulp plus the rounding of its
    log-argument: the CE gradient off the label is p itself, here over p = 1 … e^-85."""
    if classes > 1000 and not backend.fast:
        pytest.skip("too wide for the Triton interpreter")
    logits = torch.linspace(-85.0, 0.0, classes, dtype=F64).flip(0).unsqueeze(0)
    target = torch.tensor([classes - 1], device=backend.device)
    _, grad = run(functools.partial(backend.call, "label_smoothing_loss"), logits.float().to(backend.device),
                  target, smoothing=0.0, reduction="sum")
    p = torch.softmax(logits.float().double(), dim=-1)[0, :-1]
    relative = (grad[0, :-1].double().cpu() - p).abs() / p
    allowed = 4e-7 + 2 * 2.0**-24 * p.log().abs()
    worst = (relative / allowed).max().item()
    assert worst <= 1, f"relative error up to {worst:.2f}x the allowance"


@pytest.mark.parametrize("name,options", [("kd_loss", dict(alpha=0.5)), ("skd_loss", dict()),
                                          ("partial_teacher_loss", dict())])
def test_large_vocabulary(backend, name, options):
    if not backend.fast:
        pytest.skip("too wide for the Triton interpreter (the streamed path is tested at C = 100)")
    student, teacher, target = inputs((2, 33000), F32, backend)
    check(backend, (name, options), student, teacher, target)


def test_float64_gradcheck(backend):
    """The backend's gradient against central differences, not only against the reference."""
    student, teacher, target = inputs((3, 9), F64, backend)
    # the interpreter pays ~50 kernel calls per case: there two cases that cover every kernel branch
    cases = CASES if backend.fast else [CASES[6], CASES[7]]
    for name, options in cases:
        if name == "reweighted_ce_loss":
            continue  # its weight is detached on purpose: not the derivative of the value
        fn = functools.partial(backend.call, name)
        rest = args(name, teacher, target)
        assert torch.autograd.gradcheck(lambda x, fn=fn, rest=rest, options=options: fn(x, *rest, reduction="sum",
                                                                                          **options),
                                        (student.clone().requires_grad_(),), eps=1e-6, atol=1e-6), name


@pytest.mark.parametrize("case", ROW_CASES)
def test_all_rows_ignored(backend, case):
    name, options = case
    student, teacher, _ = inputs((4, 40), F32, backend)
    target = torch.full((4,), -100, device=backend.device)
    for reduction in REDUCTIONS:
        loss, grad = run(functools.partial(backend.call, name), student, *args(name, teacher, target),
                         reduction=reduction, **options)
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0, reduction


@pytest.mark.parametrize("case", ROW_CASES)
def test_custom_ignore_index_and_upstream(backend, case):
    student, teacher, target = inputs((5, 13), F64, backend, ignore_some=False)
    target[2] = 7
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=F64, device=backend.device)
    check(backend, case, student, teacher, target, upstream=weights, reduction="none", ignore_index=7)
    check(backend, case, student, teacher, target, upstream=torch.tensor(2.5, device=backend.device),
          reduction="mean")
    check(backend, case, student, teacher, target, upstream=torch.tensor(1.7, device=backend.device),
          reduction="batchmean", ignore_index=None)


@pytest.mark.parametrize("case", ROW_CASES)
def test_non_contiguous_and_leading_dims(backend, case):
    base_s, base_t, _ = inputs((9, 2, 4), F32, backend, ignore_some=False)
    # [classes=9, batch, tokens] seen as [batch, tokens, classes]: a non-contiguous 3-D input
    student, teacher = base_s.permute(1, 2, 0), base_t.permute(1, 2, 0)
    assert not student.is_contiguous()
    target = torch.randint(0, 9, (2, 4), device=backend.device)
    target[0, 1] = -100
    check(backend, case, student, teacher, target, upstream=torch.randn(2, 4, device=backend.device),
          reduction="none")
    check(backend, case, student, teacher, target, reduction="batchmean")
    # transposed storage (column stride ≠ 1) and every-other-row views
    student = inputs((11, 4), F32, backend)[0].t()
    teacher = inputs((8, 11), F32, backend, seed=1)[0][::2]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    check(backend, case, student, teacher, target[0], reduction="sum")


@pytest.mark.parametrize("normalize", ["layernorm", "l2", "standardize"])
@pytest.mark.parametrize("dtype", [pytest.param(F64, id="float64"), pytest.param(F32, id="float32")])
def test_skd_degenerate_rows(backend, normalize, dtype):
    """Constant rows (zero spread; for l2 also the zero row): finite, and equal to the reference.
    The constants are exact in binary so both sides see a zero centred row."""
    student, teacher, target = inputs((4, 16), dtype, backend, ignore_some=False)
    student[0] = 1.5
    student[1] = 0.0
    teacher[2] = -2.0
    teacher[3] = 0.0
    multiplier = 1.0 if normalize == "standardize" else 2.0
    check(backend, ("skd_loss", dict(normalize=normalize, multiplier=multiplier, alpha=0.5)), student, teacher,
          target, reduction="sum")


def test_partial_teacher_confident_teacher_stays_finite(backend):
    """ρ → 1 in fp32 (a teacher margin of 60): log(1 − ρ) comes from the LSE over c ≠ y."""
    student = inputs((3, 9), F32, backend)[0]
    target = torch.tensor([0, 4, 8], device=backend.device)
    teacher = torch.zeros(3, 9, device=backend.device)
    teacher[torch.arange(3), target] = 60.0
    (loss, grad), _ = check(backend, ("partial_teacher_loss", dict(temperature=1.0, alpha=0.5)), student, teacher,
                            target, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


# --- special values -----------------------------------------------------------------------------

TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 8.0]
MASK_CASES = [
    pytest.param(("kd_loss", dict()), id="kd"),
    pytest.param(("kd_loss", dict(alpha=0.5)), id="kd-ce"),
    pytest.param(("skd_loss", dict(alpha=0.5, normalize="layernorm")), id="skd-layernorm"),
    pytest.param(("partial_teacher_loss", dict(alpha=0.5)), id="partial_teacher"),
    pytest.param(("label_smoothing_loss", dict(smoothing=0.2)), id="label_smoothing"),
    pytest.param(("reweighted_ce_loss", dict(alpha=0.7)), id="reweighted_ce"),
]
#: labels of the masked batch (row 6 ignored); no label sits on a masked student entry
MASK_LABELS = [3, 5, 7, 2, 4, 9, -100, 11]


def masked_batch(dtype, value, device, *, student_masks_mass=True, student_masks=True):
    """8 rows × 40 classes, one masking pattern per row (``value`` is −inf or finfo.min):
    0 teacher tail masked (the issue's example); 1 student tail masked where the teacher has mass;
    2 both tails masked (same positions); 3 teacher every third class, student the classes after
    (different positions); 4 both every odd class; 5 nothing masked; 6 ignored row, everything
    masked; 7 every teacher class but the label masked. ``student_masks_mass=False`` leaves out the
    student masks where the teacher has mass (rows 1, 3); ``student_masks=False`` every student mask
    but the ignored row's."""
    student_masks_mass = student_masks_mass and student_masks
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(8, 40, generator=generator, dtype=F64) * 3
    teacher = torch.randn(8, 40, generator=generator, dtype=F64) * 3
    student, teacher = student.to(dtype), teacher.to(dtype)
    teacher[0, 30:] = value
    if student_masks_mass:
        student[1, 30:] = value
    if student_masks:
        student[2, 30:] = value
        student[4, 1::2] = value
    teacher[2, 30:] = value
    teacher[3, ::3] = value
    if student_masks_mass:
        student[3, 1::3] = value
    teacher[4, 1::2] = value
    student[6] = value
    teacher[6] = value
    keep = teacher[7, 11].clone()
    teacher[7] = value
    teacher[7, 11] = keep
    target = torch.tensor(MASK_LABELS)
    return student.to(device), teacher.to(device), target.to(device)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("value", ["-inf", "finfo.min"])
@pytest.mark.parametrize("case", MASK_CASES)
def test_masked_vocabulary(backend_or_variant, case, value, dtype):
    """Masked classes (−inf, or the dtype's most negative finite value) in the teacher, the student
    or both, at T ∈ {0.5, 1, 2, 4, 8}: values, gradients and their NaN/inf pattern equal the
    reference's (finite wherever the reference is finite; +inf where the student masks a class the
    teacher gives mass to)."""
    backend = backend_or_variant
    name, options = case
    streamed = backend.kernel_options is not None
    if streamed and dtype != F32:
        pytest.skip("the streamed variant (slow under the interpreter) runs fp32 only")
    mask = float("-inf") if value == "-inf" else torch.finfo(dtype).min
    if name == "skd_loss" and value == "finfo.min" and dtype != F16:
        pytest.skip("SKD's row variance of a finfo.min entry overflows the compute dtype (fp16 inputs excepted)")
    # A student finfo.min where the teacher has mass costs about T·q·finfo.max: at the overflow threshold
    # of the loss dtype (fp32 for fp32/bf16, fp64 for fp64), and finfo.min / T overflows for T < 1, so
    # which side a rounding lands on is no property to test; those rows are kept for fp16 only. The
    # partial teacher and label smoothing give every class mass: there no student mask is kept.
    overflow = value == "finfo.min" and dtype != F16
    every_class_has_mass = name in ("partial_teacher_loss", "label_smoothing_loss")
    upstream = torch.linspace(0.5, 2.0, 8, dtype=F64, device=backend.device)
    temperatures = ([0.5, 4.0] if streamed else TEMPERATURES) if name in HAS_TEMPERATURE else [None]
    for temperature in temperatures:
        student, teacher, target = masked_batch(dtype, mask, backend.device, student_masks_mass=not overflow,
                                                student_masks=not (overflow and every_class_has_mass))
        extra = {} if temperature is None else dict(temperature=temperature)
        try:
            (loss, grad), (ref_loss, _) = check(backend, (name, options), student, teacher, target,
                                                upstream=upstream, reduction="none", **extra)
        except AssertionError as error:
            raise AssertionError(f"T={temperature}: {error}") from None
        assert_nan_rows_whole(loss, grad, f"{name} T={temperature}")
        if name != "skd_loss" and value == "-inf":  # the rule itself, beyond agreeing with the reference
            # the partial teacher and label smoothing give every class mass: a student mask costs +inf
            finite_rows = [0, 5, 6, 7] if name in ("label_smoothing_loss", "partial_teacher_loss") else [0, 2, 4, 5, 6, 7]
            assert torch.isfinite(ref_loss[finite_rows]).all() and torch.isfinite(loss[finite_rows]).all()
            assert torch.isfinite(grad).all(), f"T={temperature}: non-finite gradient entries"


@pytest.mark.parametrize("value", ["-inf", "finfo.min"])
def test_masked_vocabulary_sum_and_batchmean(backend_or_variant, value):
    """Reduced losses over rows masked without +inf (teacher masks, both at the same positions)."""
    backend = backend_or_variant
    mask = float("-inf") if value == "-inf" else torch.finfo(F32).min
    student, teacher, target = masked_batch(F32, mask, backend.device, student_masks_mass=False)
    for name, options in (("kd_loss", dict(alpha=0.5)), ("reweighted_ce_loss", dict())):
        for reduction in ("sum", "batchmean"):
            (loss, _), _ = check(backend, (name, options), student, teacher, target, reduction=reduction,
                                 upstream=torch.tensor(1.7, device=backend.device))
            assert torch.isfinite(loss), (name, reduction)


def test_issue_example_masked_teacher_tail(backend_or_variant):
    """The issue's example: a teacher whose last ten classes are −inf gives the reference's finite loss."""
    torch.manual_seed(0)
    s = torch.randn(4, 40, device=backend_or_variant.device)
    t = torch.randn(4, 40, device=backend_or_variant.device)
    t[:, 30:] = float("-inf")
    (loss, grad), (ref_loss, _) = compare(backend_or_variant, "kd_loss", s, t)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(ref_loss)


def test_partial_teacher_every_other_class_masked(backend_or_variant):
    """Every non-label teacher class −inf: ρ = 1, q^pt is one-hot, everything finite."""
    backend = backend_or_variant
    student = inputs((3, 20), F32, backend)[0]
    target = torch.tensor([0, 7, 19], device=backend.device)
    teacher = torch.full((3, 20), float("-inf"), device=backend.device)
    teacher[torch.arange(3), target] = torch.tensor([1.0, -3.0, 40.0], device=backend.device)
    for temperature in (0.5, 1.0, 4.0):
        (loss, grad), _ = check(backend, ("partial_teacher_loss", dict(alpha=0.5, temperature=temperature)),
                                student, teacher, target, reduction="none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(BF16, id="bfloat16"),
                                   pytest.param(F64, id="float64")])
@pytest.mark.parametrize("case", [p for p in ROW_CASES if p.values[0][0] not in ("skd_loss", "label_smoothing_loss")])
def test_huge_finite_logits(backend, case, dtype):
    """Entries of ±0.9·finfo.max (finite; their differences overflow) in the student, the teacher
    and both: the NaN/inf pattern and the finite values equal the reference's. (SKD's row variance
    and label smoothing's mean log-probability overflow the compute dtype there: not meaningful.)"""
    student, teacher, target = inputs((6, 20), dtype, backend, ignore_some=False)
    big = 0.9 * torch.finfo(dtype).max
    student[0, 3] = big
    teacher[1, 4] = big
    student[2, 5] = -big
    teacher[3, 6] = -big
    student[4, 7], teacher[4, 7] = big, big
    target[1] = -100
    (loss, grad), _ = check(backend, case, student, teacher, target, reduction="none",
                            upstream=torch.linspace(0.5, 2.0, 6, dtype=F64, device=backend.device))
    assert_nan_rows_whole(loss, grad, case[0])


@pytest.mark.parametrize("case", ROW_CASES)
def test_nan_and_inf_rows(backend_or_variant, case):
    """NaN and ±inf logits: the NaN/inf pattern of loss and gradient equals the reference's, a NaN
    row's gradient is NaN as a whole, the other rows keep their values (rows: 0 student NaN entry,
    1 teacher NaN entry, 2 student +inf, 3 teacher +inf, 4 ignored, student NaN and teacher +inf,
    5 control, 6 student all −inf, 7 teacher all NaN)."""
    backend = backend_or_variant
    name, options = case
    student, teacher, target = inputs((8, 40), F32, backend, ignore_some=False)
    student[0, 5] = float("nan")
    teacher[1, 7] = float("nan")
    student[2, 3] = float("inf")
    teacher[3, 3] = float("inf")
    student[4] = float("nan")
    teacher[4] = float("inf")
    target[4] = -100
    student[6] = float("-inf")
    teacher[7] = float("nan")
    (loss, grad), (ref_loss, ref_grad) = check(backend, case, student, teacher, target, reduction="none",
                                               upstream=torch.linspace(0.5, 2.0, 8, device=backend.device))
    assert_nan_rows_whole(loss, grad, name)
    nan_rows = [0, 6] if name == "label_smoothing_loss" else [0, 1, 6, 7]
    assert ref_loss[nan_rows].isnan().all() and ref_grad[nan_rows].isnan().all(), "the reference's own rule"
    assert loss[4] == 0 and torch.count_nonzero(grad[4]) == 0, "the ignored row"
    assert torch.isfinite(loss[5]) and torch.isfinite(grad[5]).all(), "the control row"


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("case", ROW_CASES)
def test_ignored_rows_holding_nan_are_absent(backend_or_variant, case, reduction):
    """An ignored row holding NaN (student and teacher) and inf: zero loss, zero gradient, and the
    reduced loss equals the one without that row."""
    backend = backend_or_variant
    if backend.kernel_options is not None and reduction != "sum":
        pytest.skip("the streamed variant (slow under the interpreter) runs reduction='sum' only")
    student, teacher, target = inputs((4, 40), F32, backend, ignore_some=False)
    student[1], teacher[1] = float("nan"), float("nan")
    student[2, :3], teacher[2, 3:6] = float("inf"), float("-inf")
    target[1] = target[2] = -100
    (loss, grad), _ = check(backend, case, student, teacher, target, reduction=reduction,
                            upstream=torch.tensor(1.7, device=backend.device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[1:3]) == 0


LABEL_CASES = [pytest.param(case, id=case_id) for case, case_id in zip(CASES, IDS)
               if case[0] != "kd_loss" or case[1].get("alpha", 1.0) < 1]


@pytest.mark.parametrize("layout", ["strided", "int32", "int32-strided", "int16"])
@pytest.mark.parametrize("case", LABEL_CASES)
def test_label_dtype_and_stride(backend, case, layout):
    """Labels of any integer dtype and stride (a view ``labels_big[::2]``) give the contiguous
    int64 labels' loss and gradient."""
    student, teacher, target = inputs((5, 40), F32, backend)
    dtype = {"strided": torch.int64, "int32": torch.int32, "int32-strided": torch.int32, "int16": torch.int16}[layout]
    if "strided" in layout:
        big = torch.randint(0, 40, (10,), device=backend.device).to(dtype)
        big[::2] = target.to(dtype)
        labels = big[::2]
        assert not labels.is_contiguous()
    else:
        labels = target.to(dtype)
    name, options = case
    got = run(functools.partial(backend.call, name), student, *args(name, teacher, labels), reduction="none",
              **options)
    want = run(functools.partial(kdfast.__dict__[name], backend="reference"), f64(student),
               *args(name, f64(teacher), target.long()), reduction="none", **options)
    loss_tol, grad_tol = backend.tol(F32)
    assert_matches(got[0], want[0], loss_tol, f"{name} loss", per_entry=True)
    assert_matches(got[1], want[1], grad_tol, f"{name} grad", per_entry=False)


# --- invariants on the raw kernel outputs (spec §6, §8) -----------------------------------------


def _defaults(name, options):
    """The public defaults of a row loss, overridden by options (what functional.py passes)."""
    signature = inspect.signature(getattr(reference, name))
    defaults = {key: p.default for key, p in signature.parameters.items() if p.kind == p.KEYWORD_ONLY}
    defaults.update(options)
    defaults.pop("reduction", None)
    return defaults


def _row_kernel(backend):
    kernel = backend.kernels().row_softmax
    return functools.partial(kernel, **(backend.kernel_options or {}).get("row_softmax", {}))


@pytest.mark.parametrize("case", ROW_CASES)
def test_kernel_gradient_rows_sum_to_zero(backend_or_variant, case):
    from kdfast.backends._fused import row_softmax_params

    name, options = case
    if options.get("normalize") == "l2":
        pytest.skip("the uncentred l2 projection is not shift-invariant, so its gradient need not sum to 0")
    kernel = _row_kernel(backend_or_variant)
    params, _, _ = row_softmax_params(name, reduction="none", **_defaults(name, options))
    student, teacher, target = inputs((4, 50), F32, backend_or_variant)
    loss, grad = kernel(student, teacher, target, params)
    assert loss.dtype == F32 and grad.dtype == F32
    scale = grad.abs().amax(dim=-1).clamp_min(1e-30)
    assert (grad.double().sum(dim=-1).abs() / scale).max() < 1e-5
    assert loss[1] == 0 and torch.count_nonzero(grad[1]) == 0  # the ignored row


@pytest.mark.parametrize("normalize", ["layernorm", "standardize", "l2"])
def test_kernel_skd_gradient_orthogonality(backend_or_variant, normalize):
    """The SKD gradient is orthogonal to the centred logits (layernorm, standardize) and, for l2,
    to the logits themselves."""
    from kdfast.backends._fused import row_softmax_params

    kernel = _row_kernel(backend_or_variant)
    student, teacher, target = inputs((4, 50), F32, backend_or_variant, ignore_some=False)
    params, _, _ = row_softmax_params("skd_loss", temperature=3.0, alpha=0.4, reduction="sum", ignore_index=-100,
                                      normalize=normalize, multiplier=2.0, eps=1e-7)
    _, grad = kernel(student, teacher, target, params)
    grad, student = grad.double(), student.double()
    axis = student if normalize == "l2" else student - student.mean(dim=-1, keepdim=True)
    dot = (grad * axis).sum(dim=-1) / (grad.norm(dim=-1) * axis.norm(dim=-1))
    assert dot.abs().max().item() < 1e-5


def test_kernel_label_out_of_range_is_an_error(backend):
    if backend.name not in ("cpu", "cuda"):
        pytest.skip("only the compiled kernels check labels themselves (the public ops check them everywhere)")
    from kdfast.backends._fused import RowSoftmaxParams

    module = backend.kernels()
    student, teacher, _ = inputs((3, 5), F32, backend)
    with pytest.raises(RuntimeError, match="outside"):
        module.row_softmax(student, teacher, torch.tensor([0, 5, 1], device=backend.device),
                           RowSoftmaxParams(ce_weight=1.0))


# --- ops built on the row kernels: L2RKD, fused-linear KD ----------------------------------------


def test_l2rkd_with_masked_teacher(backend):
    """L2RKD (KD on clean and mixed inputs + CE) with −inf teacher classes equals the reference."""
    student, teacher, target = inputs((4, 40), F32, backend)
    mixed_student, mixed_teacher, _ = inputs((4, 40), F32, backend, seed=1)
    teacher[:, 30:] = float("-inf")
    mixed_teacher[:, 35:] = float("-inf")
    mixed_teacher[0, :5] = float("-inf")
    (loss, grad), _ = compare(backend, "l2rkd_loss", student, teacher, mixed_student, mixed_teacher, target,
                              temperature=2.0, upstream=torch.tensor(1.7, device=backend.device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(F64, id="float64")])
def test_fused_linear_kd_with_masked_teacher_bias(backend, dtype):
    """fused_linear_kd_loss with a −inf entry in the teacher's output bias (a masked vocabulary
    entry): loss and the gradients of hidden, weight and bias equal the materialised reference."""
    generator = torch.Generator().manual_seed(5)
    rows, hidden, vocab = 6, 8, 24
    tensors = dict(student_hidden=torch.randn(rows, hidden, generator=generator),
                   student_weight=torch.randn(vocab, hidden, generator=generator) / hidden**0.5,
                   teacher_hidden=torch.randn(rows, hidden, generator=generator),
                   teacher_weight=torch.randn(vocab, hidden, generator=generator),
                   student_bias=torch.randn(vocab, generator=generator),
                   teacher_bias=torch.randn(vocab, generator=generator))
    tensors["teacher_bias"][[3, 17]] = float("-inf")
    target = torch.randint(0, vocab, (rows,), generator=generator).to(backend.device)
    target[1] = -100
    learnable = ("student_hidden", "student_weight", "student_bias")

    def run_fused(name, cast):
        values = {key: cast(value).to(backend.device).requires_grad_(key in learnable) for key, value in tensors.items()}
        loss = kdfast.fused_linear_kd_loss(values["student_hidden"], values["student_weight"], values["teacher_hidden"],
                                           values["teacher_weight"], target, student_bias=values["student_bias"],
                                           teacher_bias=values["teacher_bias"], alpha=0.5, temperature=2.0,
                                           backend=name)
        grads = torch.autograd.grad(loss * 1.7, [values[key] for key in learnable])
        return loss.detach(), grads

    loss, grads = run_fused(backend.name, lambda t: t.to(dtype))
    ref_loss, ref_grads = run_fused("reference", lambda t: t.to(dtype).double())
    loss_tol, grad_tol = backend.tol(dtype)
    assert_matches(loss, ref_loss.to(loss.dtype), loss_tol, "fused-linear loss", per_entry=True)
    assert torch.isfinite(loss)
    for key, got, want in zip(learnable, grads, ref_grads):
        assert_matches(got, want, (grad_tol[0] * 10, grad_tol[1] * 10), f"fused-linear {key} grad", per_entry=False)
