"""backend="triton" against kdfast.reference: every loss, values and gradients.

Runs on CPU tensors under the Triton interpreter (conftest sets TRITON_INTERPRET=1 without a GPU)
and on CUDA tensors when a GPU is present: the same tests, the device parametrised by
availability. Shapes are tiny because the interpreter runs each program in Python.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot be tested")

import kdfast  # noqa: E402
from kdfast import reference  # noqa: E402
from kdfast.backends import _fused  # noqa: E402
from kdfast.backends import triton as triton_backend  # noqa: E402
from kdfast.backends.triton import landmark_gram as gram_module  # noqa: E402
from kdfast.backends.triton import rowsoftmax as rowsoftmax_module  # noqa: E402
from kdfast.backends.triton.feature_centre import feature_centre  # noqa: E402
from kdfast.backends.triton.landmark_gram import landmark_gram  # noqa: E402
from kdfast.backends.triton.rowsoftmax import row_softmax  # noqa: E402

#: C = 1 with a partial teacher takes log(0) = −inf on purpose (no other class); numpy says so
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

DEVICES = (["cuda"] if torch.cuda.is_available() else []) + \
    (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
if not DEVICES:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set: nothing can run Triton kernels",
                allow_module_level=True)

#: (loss atol, loss rtol, grad tolerance relative to the largest reference gradient) per input dtype.
#: The reference runs in fp64 on the same (upcast) inputs; the kernels compute in fp32, so fp16/bf16
#: differ from fp32 only by the rounding of the stored gradient (bf16: 8 mantissa bits).
TOLERANCES = {
    torch.float32: (2e-5, 1e-5, 2e-6),
    torch.float16: (2e-5, 1e-5, 2e-3),
    torch.bfloat16: (2e-5, 1e-5, 1e-2),
    torch.float64: (1e-6, 1e-6, 1e-6),  # fp64 computed in fp64; hyper-parameters travel as fp32
}
DTYPES = list(TOLERANCES)

ROW_LOSSES = {
    "kd": ("kd_loss", dict(temperature=4.0, alpha=1.0), True),
    "kd_ce": ("kd_loss", dict(temperature=2.0, alpha=0.3), True),
    "skd_layernorm": ("skd_loss", dict(normalize="layernorm", alpha=0.6), True),
    "skd_l2": ("skd_loss", dict(normalize="l2", alpha=0.6, multiplier=3.0), True),
    "skd_standardize": ("skd_loss", dict(normalize="standardize", alpha=0.6, multiplier=1.0, temperature=2.0),
                        True),
    "partial_teacher": ("partial_teacher_loss", dict(temperature=2.0, alpha=0.5), True),
    "label_smoothing": ("label_smoothing_loss", dict(smoothing=0.2), False),
    "reweighted_ce": ("reweighted_ce_loss", dict(temperature=2.0, alpha=0.7), True),
}
TARGET_REQUIRED = {"partial_teacher_loss", "label_smoothing_loss", "reweighted_ce_loss"}


def _logits(rows, classes, device, dtype, scale=3.0):
    return (torch.randn(rows, classes, device=device) * scale).to(dtype)


def _target(rows, classes, device, ignored=()):
    target = torch.randint(0, classes, (rows,), device=device)
    for row in ignored:
        target[row] = -100
    return target


def _run(fn, name, student, teacher, target, options, upstream=None):
    """(loss, d loss/d student) through ``fn`` (a loss of the kdfast signature)."""
    student = student.detach().clone().requires_grad_(True)
    args = (student, target) if teacher is None else (student, teacher, target)
    loss = fn(*args, **options)
    upstream = torch.full_like(loss, 1.7) if upstream is None else upstream  # grad_output ≠ 1
    (grad,) = torch.autograd.grad(loss, student, upstream.to(loss.dtype))
    return loss.detach(), grad


def _check_against_reference(fn, name, student, teacher, target, options, upstream=None):
    dtype = student.dtype
    loss_atol, loss_rtol, grad_rel = TOLERANCES[dtype]
    loss, grad = _run(fn, name, student, teacher, target, options, upstream)
    ref_loss, ref_grad = _run(getattr(reference, name), name, student.double(),
                              None if teacher is None else teacher.double(), target, options, upstream)
    assert grad.dtype == dtype and grad.shape == student.shape
    torch.testing.assert_close(loss.double(), ref_loss, atol=loss_atol * max(1.0, ref_loss.abs().max().item()),
                               rtol=loss_rtol)
    scale = max(ref_grad.abs().max().item(), 1e-30)
    torch.testing.assert_close(grad.double(), ref_grad, atol=grad_rel * scale, rtol=0)
    return loss, grad


def _public(name):
    return functools.partial(getattr(kdfast, name), backend="triton")


def _case_inputs(case, rows, classes, device, dtype, ignored=()):
    name, options, has_teacher = ROW_LOSSES[case]
    student = _logits(rows, classes, device, dtype)
    teacher = _logits(rows, classes, device, dtype) if has_teacher else None
    target = _target(rows, classes, device, ignored)
    return name, dict(options), student, teacher, target


# ---------------------------------------------------------------------------------------------------------------
# row-softmax family


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ROW_LOSSES))
@pytest.mark.parametrize("rows,classes", [(1, 1), (3, 7), (3, 1001)])
def test_row_losses_match_reference(device, dtype, case, rows, classes):
    ignored = (1,) if rows > 1 else ()
    name, options, student, teacher, target = _case_inputs(case, rows, classes, device, dtype, ignored)
    options["reduction"] = "sum"
    _check_against_reference(_public(name), name, student, teacher, target, options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "batchmean"])
@pytest.mark.parametrize("case", ["kd_ce", "skd_layernorm", "label_smoothing", "reweighted_ce"])
def test_row_reductions_and_upstream_gradient(device, reduction, case):
    name, options, student, teacher, target = _case_inputs(case, 5, 13, device, torch.float32, ignored=(0, 3))
    options["reduction"] = reduction
    upstream = torch.randn(5, device=device) if reduction == "none" else None
    _check_against_reference(_public(name), name, student, teacher, target, options, upstream)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(ROW_LOSSES))
def test_row_streamed_path_matches_reference(device, dtype, case):
    """A 16-column block forces the multi-pass online path (C = 100: seven blocks, a ragged last)."""
    name, options, student, teacher, target = _case_inputs(case, 3, 100, device, dtype, ignored=(2,))
    options = {**getattr(reference, name).__kwdefaults__, **options, "reduction": "sum"}  # no public defaults here
    losses = _fused.build_losses(functools.partial(row_softmax, block_size=16), feature_centre, landmark_gram)
    _check_against_reference(losses[name], name, student, teacher, target, options)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's numpy max
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [0, 16])
@pytest.mark.parametrize("case,where", [(case, where) for case, (_, _, has_teacher) in ROW_LOSSES.items()
                                        for where in ("student", "teacher") if where == "student" or has_teacher])
def test_row_nan_logit_poisons_only_its_row(device, case, where, block_size):
    """A NaN logit makes its row's loss and gradient NaN wherever the reference has them (single
    block and streamed path); the other rows are untouched."""
    name, options, student, teacher, target = _case_inputs(case, 3, 40, device, torch.float32, ignored=(1,))
    (student if where == "student" else teacher)[0, 5] = float("nan")
    options = {**getattr(reference, name).__kwdefaults__, **options, "reduction": "none"}
    losses = _fused.build_losses(functools.partial(row_softmax, block_size=block_size), feature_centre, landmark_gram)
    loss, grad = _run(losses[name], name, student, teacher, target, options)
    ref_loss, ref_grad = _run(getattr(reference, name), name, student.double(),
                              None if teacher is None else teacher.double(), target, options)
    assert torch.equal(loss.isnan().cpu(), ref_loss.isnan().cpu()), (loss, ref_loss)
    assert torch.equal(grad.isnan().cpu(), ref_grad.isnan().cpu())
    torch.testing.assert_close(loss[2:].double(), ref_loss[2:], atol=2e-5, rtol=1e-5)


def test_row_block_heuristic():
    """Whole rows up to MAX_SINGLE_BLOCK in one block; longer rows streamed; a forced block wins."""
    from kdfast.backends.triton._common import MAX_SINGLE_BLOCK, STREAM_BLOCK, row_block
    assert row_block(1) == (1, True)
    assert row_block(1001) == (1024, True)
    assert row_block(MAX_SINGLE_BLOCK) == (MAX_SINGLE_BLOCK, True)
    assert row_block(MAX_SINGLE_BLOCK + 1) == (STREAM_BLOCK, False)
    assert row_block(256_000) == (STREAM_BLOCK, False)
    assert row_block(100, 16) == (16, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [0, 16])
def test_all_rows_ignored(device, block_size):
    losses = _fused.build_losses(functools.partial(row_softmax, block_size=block_size), feature_centre, landmark_gram)
    student = _logits(4, 40, device, torch.float32).requires_grad_(True)
    teacher = _logits(4, 40, device, torch.float32)
    target = torch.full((4,), -100, device=device)
    for reduction in ("batchmean", "mean", "sum"):
        loss = losses["kd_loss"](student, teacher, target, temperature=4.0, alpha=0.5, reduction=reduction,
                                 ignore_index=-100)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 0 and torch.count_nonzero(grad) == 0
    # the kernel itself: zero rows and zero gradient, whatever reduction follows
    params, _, _ = _fused.row_softmax_params("kd_loss", temperature=4.0, alpha=0.5, reduction="sum",
                                             ignore_index=-100)
    loss_rows, grad = row_softmax(student.detach(), teacher, target, params, block_size=block_size)
    assert torch.count_nonzero(loss_rows) == 0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["kd_ce", "skd_standardize", "partial_teacher"])
def test_row_non_contiguous_inputs(device, case):
    """Transposed storage (column stride ≠ 1) and every-other-row views read in place."""
    name, options, _, _, target = _case_inputs(case, 4, 11, device, torch.float32)
    student = _logits(11, 4, device, torch.float32).t()
    teacher = _logits(8, 11, device, torch.float32)[::2]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    options["reduction"] = "batchmean"
    _check_against_reference(_public(name), name, student, teacher, target, options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [0, 16])
@pytest.mark.parametrize("normalize", ["none", "layernorm", "standardize", "l2"])
def test_row_kernel_invariants(device, block_size, normalize):
    """Spec §8 on the kernel's own gradient: softmax-family rows sum to 0 (centred or no
    normalisation); the SKD gradient is orthogonal to the centred logits (layernorm, ε-exact),
    and for l2 orthogonal to the logits themselves."""
    student = _logits(4, 50, device, torch.float32)
    teacher = _logits(4, 50, device, torch.float32)
    target = _target(4, 50, device)
    if normalize == "none":
        params, _, _ = _fused.row_softmax_params("kd_loss", temperature=3.0, alpha=0.4, reduction="sum",
                                                 ignore_index=-100)
    else:
        params, _, _ = _fused.row_softmax_params("skd_loss", temperature=3.0, alpha=0.4, reduction="sum",
                                                 ignore_index=-100, normalize=normalize, multiplier=2.0, eps=1e-7)
    _, grad = row_softmax(student, teacher, target, params, block_size=block_size)
    grad = grad.double()
    scale = grad.abs().max().item()
    assert scale > 0
    centred = student.double() - student.double().mean(dim=-1, keepdim=True)
    if normalize != "l2":
        assert grad.sum(dim=-1).abs().max().item() < 1e-5 * scale
    if normalize in ("layernorm", "standardize"):
        dot = (grad * centred).sum(dim=-1) / centred.norm(dim=-1)
        assert dot.abs().max().item() < 1e-5 * scale
    if normalize == "l2":
        dot = (grad * student.double()).sum(dim=-1) / student.double().norm(dim=-1)
        assert dot.abs().max().item() < 1e-5 * scale


@pytest.mark.parametrize("device", DEVICES)
def test_partial_teacher_confident_teacher_stays_finite(device):
    """ρ → 1 in fp32 (a teacher margin of 60): log(1 − ρ) comes from the LSE over c ≠ y."""
    student = _logits(3, 9, device, torch.float32)
    teacher = torch.zeros(3, 9, device=device)
    target = torch.tensor([0, 4, 8], device=device)
    teacher[torch.arange(3), target] = 60.0
    loss, grad = _check_against_reference(_public("partial_teacher_loss"), "partial_teacher_loss", student, teacher,
                                          target, dict(temperature=1.0, alpha=0.5, reduction="none"))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_row_float64_gradcheck(device):
    """fp64 inputs are computed in fp64, so finite differences of the kernel's loss match its gradient."""
    student = _logits(2, 5, device, torch.float64).requires_grad_(True)
    teacher = _logits(2, 5, device, torch.float64)
    target = _target(2, 5, device)
    for name, options in (("skd_loss", dict(alpha=0.5, normalize="standardize")),
                          ("partial_teacher_loss", dict(alpha=0.5, temperature=2.0))):
        fn = functools.partial(getattr(kdfast, name), teacher_logits=teacher, target=target, backend="triton",
                               **options)
        assert torch.autograd.gradcheck(lambda z: fn(z), (student,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_three_dimensional_logits(device):
    """[batch, tokens, vocab] logits go through the public flattening unchanged."""
    student = _logits(2, 3, device, torch.float32).reshape(2, 3, 1).expand(2, 3, 7).contiguous()
    student = student + torch.randn(2, 3, 7, device=device)
    teacher = torch.randn(2, 3, 7, device=device)
    target = torch.randint(0, 7, (2, 3), device=device)
    got = kdfast.kd_loss(student, teacher, target, alpha=0.5, reduction="none", backend="triton")
    want = kdfast.kd_loss(student.double(), teacher.double(), target, alpha=0.5, reduction="none",
                          backend="reference")
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# feature–centre family (ND)


def _nd_inputs(rows, dim, classes, device, dtype):
    u = torch.randn(rows, dim, device=device).to(dtype)
    teacher = (torch.randn(rows, dim, device=device) * torch.rand(rows, 1, device=device) * 2).to(dtype)
    centers = torch.randn(classes, dim, device=device).to(dtype)
    return u, teacher, centers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim,classes", [(1, 1, 1), (3, 7, 5), (8, 300, 10)])
def test_nd_matches_reference(device, dtype, rows, dim, classes):
    u, teacher, centers = _nd_inputs(rows, dim, classes, device, dtype)
    target = _target(rows, classes, device, ignored=(1,) if rows > 1 else ())
    fn = lambda *a, **k: kdfast.nd_loss(*a, centers=centers, backend="triton", **k)  # noqa: E731
    ref = functools.partial(reference.nd_loss, centers=centers.double())
    loss, grad = _run(fn, "nd_loss", u, teacher, target, dict(reduction="sum"))
    ref_loss, ref_grad = _run(ref, "nd_loss", u.double(), teacher.double(), target, dict(reduction="sum"))
    loss_atol, loss_rtol, grad_rel = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, atol=loss_atol * 10, rtol=loss_rtol)
    # d = 1 has an exactly zero cosine-branch gradient: floor the scale at the gradient's natural size
    scale = max(ref_grad.abs().max().item(), 1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, atol=grad_rel * scale, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [0, 16])
def test_nd_branches_ties_and_streaming(device, block_size):
    """Row 0: ‖u‖ > ‖f^t‖ (cosine, gradient ⟂ u); row 1: ‖u‖ < ‖f^t‖ (gradient −ê/‖f^t‖, the
    mean's 1/B aside); row 2: a tie, which takes the cosine branch; row 3 ignored. d = 50 with a
    16-wide block exercises the two-pass path."""
    u, _, centers = _nd_inputs(4, 50, 3, device, torch.float32)
    teacher = torch.stack([u[0] * 0.5, u[1] * 3.0, u[2], u[3]])
    target = torch.tensor([0, 1, 2, -100], device=device)
    losses = _fused.build_losses(row_softmax, functools.partial(feature_centre, block_size=block_size),
                                 landmark_gram)
    fn = lambda *a, **k: losses["nd_loss"](*a, centers=centers, **k)  # noqa: E731
    ref = functools.partial(reference.nd_loss, centers=centers.double())
    loss, grad = _run(fn, "nd_loss", u, teacher, target, dict(reduction="none"), torch.ones(4, device=device))
    ref_loss, ref_grad = _run(ref, "nd_loss", u.double(), teacher.double(), target, dict(reduction="none"),
                              torch.ones(4, device=device))
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    assert abs((grad[0].double() @ u[0].double()).item()) < 1e-5 * grad[0].norm().item() * u[0].norm().item()
    assert abs((grad[2].double() @ u[2].double()).item()) < 1e-5 * grad[2].norm().item() * u[2].norm().item()
    unit = centers[1].double() / centers[1].double().norm()
    torch.testing.assert_close(grad[1].double(), -unit / teacher[1].double().norm(), atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(grad[3]) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_nd_non_contiguous_and_gradcheck(device):
    u = torch.randn(6, 3, device=device, dtype=torch.float64).t()
    teacher = torch.randn(3, 12, device=device, dtype=torch.float64)[:, ::2]
    centers = torch.randn(4, 12, device=device, dtype=torch.float64)[:, 1::2]
    target = torch.tensor([0, 3, 1], device=device)
    fn = lambda z: kdfast.nd_loss(z, teacher, target, centers, backend="triton")  # noqa: E731
    torch.testing.assert_close(fn(u), reference.nd_loss(u, teacher, target, centers), atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(fn, (u.detach().requires_grad_(True),), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# landmark-Gram family (KDA / Nyström)

GRAM_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1e-2),
                   torch.float64: (1e-5, 1e-5)}  # fp64 is computed in fp32 (see landmark_gram)


def _gram_inputs(rows, ds, dt, m, device, dtype):
    return (torch.randn(rows, ds, device=device).to(dtype), torch.randn(rows, dt, device=device).to(dtype),
            torch.randn(m, ds, device=device).mul(0.5).to(dtype), torch.randn(m, dt, device=device).mul(0.5).to(dtype))


def _check_gram(fn, fs, ft, cs, ct, options):
    loss_rel, grad_rel = GRAM_TOLERANCES[fs.dtype]
    student = fs.detach().clone().requires_grad_(True)
    loss = fn(student, ft, cs, ct, **options)
    upstream = torch.rand_like(loss) + 0.5
    (grad,) = torch.autograd.grad(loss, student, upstream)
    ref_student = fs.double().requires_grad_(True)
    ref_loss = reference.nystrom_loss(ref_student, ft.double(), cs.double(), ct.double(), **options)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_student, upstream.double())
    assert grad.dtype == fs.dtype
    torch.testing.assert_close(loss.double(), ref_loss, atol=loss_rel * max(1.0, ref_loss.abs().max().item()),
                               rtol=loss_rel)
    torch.testing.assert_close(grad.double(), ref_grad, atol=grad_rel * ref_grad.abs().max().item() + 1e-30, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,ds,dt,m", [(1, 1, 3, 1), (3, 7, 5, 10), (20, 40, 24, 33)])
@pytest.mark.parametrize("kind", ["smooth_l1", "sq_fro", "fro"])
def test_nystrom_matches_reference(device, dtype, rows, ds, dt, m, kind):
    fs, ft, cs, ct = _gram_inputs(rows, ds, dt, m, device, dtype)
    reduction = "sum" if kind == "fro" else "mean"
    _check_gram(functools.partial(kdfast.nystrom_loss, backend="triton"), fs, ft, cs, ct,
                dict(kind=kind, reduction=reduction, beta=0.7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [True, False])
def test_nystrom_unfused_gradient_path_and_non_contiguous(device, normalize):
    """m = 40 with at most 16 landmarks per tile: G goes through the fp32 scratch and the second
    GEMM kernel; the student features are a transposed view."""
    fs, ft, cs, ct = _gram_inputs(17, 18, 9, 40, device, torch.float32)
    fs = fs.t().contiguous().t()
    assert not fs.is_contiguous()
    losses = _fused.build_losses(row_softmax, feature_centre, functools.partial(landmark_gram, max_fused_m=16))
    _check_gram(losses["nystrom_loss"], fs, ft, cs, ct, dict(kind="smooth_l1", normalize=normalize,
                                                             reduction="none"))


@pytest.mark.parametrize("device", DEVICES)
def test_nystrom_identical_networks_give_zero(device):
    fs, _, cs, _ = _gram_inputs(5, 20, 20, 7, device, torch.float32)
    loss = kdfast.nystrom_loss(fs.requires_grad_(True), fs.detach(), cs, cs, backend="triton")
    (grad,) = torch.autograd.grad(loss, fs)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and grad.abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# availability, custom ops, torch.compile, memory


def test_unavailable_reason(monkeypatch):
    assert triton_backend.unavailable_reason(torch.device("cuda")) is None
    assert "CUDA" in triton_backend.unavailable_reason(torch.device("meta"))
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setattr(triton_backend, "INTERPRETED", True)
    assert triton_backend.unavailable_reason(torch.device("cpu")) is None


def test_dispatch_names_triton_for_every_loss():
    for name in reference.LOSSES:
        assert name in triton_backend.LOSSES
    if torch.cuda.is_available():
        assert "triton" in kdfast.available_backends("kd_loss", "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_opcheck(device):
    """The ops are registered in the kdfast namespace with a working fake (meta) implementation."""
    student = _logits(3, 10, device, torch.float32)
    teacher = _logits(3, 10, device, torch.float32)
    target = _target(3, 10, device, ignored=(1,))
    torch.library.opcheck(torch.ops.kdfast.triton_row_softmax.default,
                          (student, teacher, target, "layernorm", "softmax", 2.0, 1e-7, 4.0, 8.0, 0.5, 0.0, False,
                           0.0, 1e-6, -100, 0))
    u, ft, centers = _nd_inputs(3, 12, 4, device, torch.float32)
    torch.library.opcheck(torch.ops.kdfast.triton_feature_centre.default,
                          (u, ft, torch.tensor([0, 3, 1], device=device), centers, 1e-8, 0))
    fs, ft, cs, ct = _gram_inputs(3, 8, 6, 5, device, torch.float32)
    gram = (ft @ ct.T).contiguous()
    scale = torch.tensor(0.25, device=device)
    torch.library.opcheck(torch.ops.kdfast.triton_landmark_gram.default, (fs, gram, cs, scale, "smooth_l1", 1.0, 256))


@pytest.mark.parametrize("device", DEVICES)
def test_no_graph_break_and_compiled_gradients(device):
    """torch._dynamo sees the whole loss (kernel launch, autograd.Function, reduction) as one
    graph, and aot_eager compilation reproduces the eager values and gradients. Traced on the
    backend's loss functions: the public ``kdfast.*`` entry points add the dispatcher, whose
    ``importlib.import_module`` is a dynamo graph break of its own (outside this backend)."""
    torch._dynamo.reset()
    student = _logits(3, 10, device, torch.float32).requires_grad_(True)
    teacher = _logits(3, 10, device, torch.float32)
    target = _target(3, 10, device)
    u, ft, centers = _nd_inputs(3, 12, 10, device, torch.float32)
    fs, gt, cs, ct = _gram_inputs(3, 8, 6, 5, device, torch.float32)
    losses = triton_backend.LOSSES

    def total(student, u, fs):
        return (losses["skd_loss"](student, teacher, target, temperature=4.0, multiplier=2.0, alpha=0.5, eps=1e-7,
                                   normalize="layernorm", reduction="batchmean", ignore_index=-100)
                + losses["nd_loss"](u, ft, target, centers)
                + losses["nystrom_loss"](fs, gt, cs, ct))

    inputs = (student, u.requires_grad_(True), fs.requires_grad_(True))
    explanation = torch._dynamo.explain(total)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(total, backend="aot_eager", fullgraph=True)
    eager_loss = total(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    compiled_loss = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_no_row_by_class_temporaries_besides_the_gradient():
    """The row-softmax op allocates exactly its two outputs: the [N] loss rows and the [N, C]
    gradient; no [N, C] fp32 loss or probability buffer. Counted with the profiler's memory events
    on CPU tensors (the interpreter's own numpy copies are not torch allocations)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts CPU allocations; on CUDA use torch.cuda.max_memory_allocated in the benchmark")
    rows, classes = 4, 2000
    student = _logits(rows, classes, "cpu", torch.bfloat16)
    teacher = _logits(rows, classes, "cpu", torch.bfloat16)
    target = _target(rows, classes, "cpu")
    params, _, _ = _fused.row_softmax_params("skd_loss", temperature=4.0, alpha=0.5, reduction="sum",
                                             ignore_index=-100, normalize="layernorm", multiplier=2.0, eps=1e-7)
    row_softmax(student, teacher, target, params)  # warm the kernel cache outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        row_softmax(student, teacher, target, params)
    sizes = [event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage > 0]
    big = [size for size in sizes if size >= rows * classes * student.element_size()]
    assert big == [rows * classes * student.element_size()], sizes  # the bf16 gradient, nothing else
