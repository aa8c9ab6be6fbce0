"""backend="cpu" (the C++ kernels) against the reference: values and gradients of every loss and
reduction, every dtype, odd shapes, ignored rows, non-unit upstream gradients, non-contiguous and
N-D inputs, SKD's normalisations and degenerate rows, the spec §8 invariants on the raw kernel
outputs, backend choice and torch.compile.

The truth is always kdfast.reference run in float64 on the (upcast) inputs the kernel saw.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

import kdfast
import kdfast.reference as reference

cpu = pytest.importorskip("kdfast.backends.cpu", reason="kdfast's CPU extension is not built")

#: max |kernel − reference| allowed, relative to max |reference| (+1 for values near 0):
#: fp32 keeps fp32 accumulators and a few-ulp exp; bf16/fp16 gradients are rounded once at the end
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
#: losses are fp32 for every half dtype, so they keep the fp32 tolerance
LOSS_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]

# (loss, options, uses teacher, needs target)
ROW_CASES = [
    ("kd_loss", dict(), True, False),
    ("kd_loss", dict(alpha=0.3, temperature=2.0), True, True),
    ("kd_loss", dict(alpha=0.5, temperature=1.0), True, True),
    ("skd_loss", dict(), True, False),
    ("skd_loss", dict(alpha=0.4, normalize="layernorm"), True, True),
    ("skd_loss", dict(alpha=0.4, normalize="l2", multiplier=3.0), True, True),
    ("skd_loss", dict(alpha=0.7, normalize="standardize", multiplier=1.0, temperature=2.0), True, True),
    ("partial_teacher_loss", dict(), True, True),
    ("partial_teacher_loss", dict(alpha=1.0, temperature=3.0), True, True),
    ("label_smoothing_loss", dict(smoothing=0.2), False, True),
    ("reweighted_ce_loss", dict(), True, True),
    ("reweighted_ce_loss", dict(alpha=0.9, temperature=2.0), True, True),
]
ROW_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'default'}"
           for name, options, _, _ in ROW_CASES]
REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if expected.numel() == 0:
        return
    error = (actual - expected).abs().max().item()
    bound = tolerance * (1 + expected.abs().max().item())
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


def row_inputs(shape, dtype, *, spread=3.0, ignore_some=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * spread).to(dtype)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * spread).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    if ignore_some and target.numel() > 1:
        target.view(-1)[1] = -100
    return student, teacher, target


def call(name, student, teacher, target, options, backend, *, upstream=None):
    """(loss, ∂(loss·upstream)/∂student) through the public op."""
    student = student.detach().clone().requires_grad_()
    arguments = [student] + ([teacher] if name != "label_smoothing_loss" else []) + ([target] if target is not None
                                                                                     else [])
    loss = getattr(kdfast, name)(*arguments, backend=backend, **options)
    weighted = loss if upstream is None else loss * upstream
    (weighted.sum() if weighted.dim() else weighted).backward()
    return loss.detach(), student.grad


def compare(name, student, teacher, target, options, *, upstream=None):
    dtype = student.dtype
    loss, grad = call(name, student, teacher, target, options, "cpu", upstream=upstream)
    assert grad.dtype == dtype
    ref_upstream = None if upstream is None else upstream.double()
    ref_loss, ref_grad = call(name, student.double(), teacher.double(), target, options, "reference",
                              upstream=ref_upstream)
    close(loss, ref_loss, LOSS_TOLERANCE[dtype], f"{name} loss")
    close(grad, ref_grad, TOLERANCE[dtype], f"{name} grad")
    return loss, grad


# --- row-softmax family -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_row_losses_float64(case, reduction):
    name, options, _, needs_target = case
    student, teacher, target = row_inputs((5, 37), torch.float64)
    compare(name, student, teacher, target, dict(options, reduction=reduction))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_row_losses_low_precision(case, dtype):
    name, options, _, _ = case
    student, teacher, target = row_inputs((6, 1001), dtype)
    compare(name, student, teacher, target, dict(options, reduction="sum"))


@pytest.mark.parametrize("rows", [0, 1, 3])
@pytest.mark.parametrize("classes", [1, 7, 1001])
@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_row_shapes(case, rows, classes):
    name, options, _, _ = case
    student, teacher, target = row_inputs((rows, classes), torch.float64)
    compare(name, student, teacher, target, dict(options, reduction="batchmean"))


@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_row_wide_logit_range_float32(case):
    """Logits spread over hundreds of units at T = 1: most exps underflow fp32 (the kernel's own
    exp flushes below ln FLT_MIN) and the rest must still match the float64 reference."""
    name, options, _, _ = case
    student, teacher, target = row_inputs((4, 515), torch.float32, spread=80.0)
    options = dict(options, reduction="sum")
    if "temperature" in inspect.signature(getattr(kdfast, name)).parameters:
        options["temperature"] = 1.0
    compare(name, student, teacher, target, options)


@pytest.mark.parametrize("classes", [8001, 8])
def test_row_softmax_tail_entries_keep_their_relative_precision(classes):
    """Every softmax entry, not only the large ones, to within a few ulp plus the rounding of its
    log-argument: the CE gradient off the label is p itself, here over p = 1 … e^-85 (the fp32 exp
    rounds its base-2 argument and its slope log2 e, each worth up to |x|·2^-24 of exp(x))."""
    logits = torch.linspace(-85.0, 0.0, classes, dtype=torch.float64).flip(0).unsqueeze(0)
    target = torch.tensor([classes - 1])
    x = logits.float().requires_grad_()
    kdfast.label_smoothing_loss(x, target, smoothing=0.0, reduction="sum", backend="cpu").backward()
    p = torch.softmax(logits.float().double(), dim=-1)[0, :-1]
    relative = (x.grad[0, :-1].double() - p).abs() / p
    allowed = 4e-7 + 2 * 2.0**-24 * p.log().abs()
    worst = (relative / allowed).max().item()
    assert worst <= 1, f"relative error up to {worst:.2f}x the allowance"


@pytest.mark.parametrize("name,options", [("kd_loss", dict(alpha=0.5)), ("skd_loss", dict()),
                                          ("partial_teacher_loss", dict())])
def test_row_large_classes(name, options):
    student, teacher, target = row_inputs((2, 33000), torch.float32)
    compare(name, student, teacher, target, options)


def test_float64_gradcheck():
    """The kernel's gradient against central differences, not only against the reference."""
    student, teacher, target = row_inputs((3, 9), torch.float64)
    for name, options, _, _ in ROW_CASES:
        if name == "reweighted_ce_loss":
            continue  # its weight is detached on purpose: not the derivative of the value
        args = ([teacher] if name != "label_smoothing_loss" else []) + [target]

        def loss(x, name=name, args=args, options=options):
            return getattr(kdfast, name)(x, *args, backend="cpu", reduction="sum", **options)

        assert torch.autograd.gradcheck(loss, (student.clone().requires_grad_(),)), name


@pytest.mark.parametrize("case,where", [(case, where) for case in ROW_CASES for where in ("student", "teacher")
                                        if where == "student" or case[2]],
                         ids=[f"{case_id}-{where}" for case, case_id in zip(ROW_CASES, ROW_IDS)
                              for where in ("student", "teacher") if where == "student" or case[2]])
def test_row_nan_logit_poisons_only_its_row(case, where):
    """A NaN logit gives its row a NaN loss and NaN gradient wherever the reference has them (never
    a finite value computed as if the entry were absent); the other rows keep their values."""
    name, options, _, _ = case
    student, teacher, target = row_inputs((3, 37), torch.float32)
    (student if where == "student" else teacher)[0, 5] = float("nan")
    options = dict(options, reduction="none")
    loss, grad = call(name, student, teacher, target, options, "cpu")
    ref_loss, ref_grad = call(name, student.double(), teacher.double(), target, options, "reference")
    assert torch.equal(loss.isnan(), ref_loss.isnan()), (loss, ref_loss)
    assert torch.equal(grad.isnan(), ref_grad.isnan()), (grad.isnan().sum(1), ref_grad.isnan().sum(1))
    assert loss[2:].isfinite().all()
    close(loss[2:], ref_loss[2:], LOSS_TOLERANCE[torch.float32], f"{name} loss")
    close(grad[2:], ref_grad[2:], TOLERANCE[torch.float32], f"{name} grad")


@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_row_all_rows_ignored(case):
    name, options, _, _ = case
    student, teacher, _ = row_inputs((4, 11), torch.float32)
    target = torch.full((4,), -100)
    for reduction in REDUCTIONS:
        loss, grad = call(name, student, teacher, target, dict(options, reduction=reduction), "cpu")
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_row_custom_ignore_index_and_upstream(case):
    name, options, _, _ = case
    student, teacher, target = row_inputs((5, 13), torch.float64, ignore_some=False)
    target[2] = 7
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0])
    compare(name, student, teacher, target, dict(options, reduction="none", ignore_index=7), upstream=weights)
    compare(name, student, teacher, target, dict(options, reduction="mean"), upstream=torch.tensor(2.5))


@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_row_non_contiguous_and_leading_dims(case):
    name, options, _, _ = case
    base_s, base_t, _ = row_inputs((9, 2, 4), torch.float32, ignore_some=False)
    # [classes=9, batch, tokens] seen as [batch, tokens, classes]: a non-contiguous 3-D input
    student, teacher = base_s.permute(1, 2, 0), base_t.permute(1, 2, 0)
    assert not student.is_contiguous()
    target = torch.randint(0, 9, (2, 4))
    target[0, 1] = -100
    compare(name, student, teacher, target, dict(options, reduction="none"), upstream=torch.randn(2, 4))
    compare(name, student, teacher, target, dict(options, reduction="batchmean"))


@pytest.mark.parametrize("normalize", ["layernorm", "l2", "standardize"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_skd_degenerate_rows(normalize, dtype):
    """Constant rows (zero spread; for l2 also the zero row): finite, and equal to the reference.
    The constants are exact in binary so both sides see a zero centred row."""
    student, teacher, target = row_inputs((4, 16), dtype, ignore_some=False)
    student[0] = 1.5
    student[1] = 0.0
    teacher[2] = -2.0
    teacher[3] = 0.0
    multiplier = 1.0 if normalize == "standardize" else 2.0
    compare("skd_loss", student, teacher, target,
            dict(normalize=normalize, multiplier=multiplier, alpha=0.5, reduction="sum"))


# --- invariants on the raw kernel outputs (spec §6, §8) -----------------------------------------


@pytest.mark.parametrize("case", ROW_CASES, ids=ROW_IDS)
def test_kernel_gradient_rows_sum_to_zero(case):
    from kdfast.backends._fused import row_softmax_params

    name, options, _, _ = case
    if options.get("normalize") == "l2":
        pytest.skip("the uncentred l2 projection is not shift-invariant, so its gradient need not sum to 0")
    params, _, _ = row_softmax_params(name, reduction="none", **_defaults(name, options))
    student, teacher, target = row_inputs((4, 50), torch.float32)
    loss, grad = cpu.row_softmax(student, teacher, target, params)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    scale = grad.abs().amax(dim=-1).clamp_min(1e-30)
    assert (grad.double().sum(dim=-1).abs() / scale).max() < 1e-5
    assert loss[1] == 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))  # the ignored row


@pytest.mark.parametrize("normalize", ["layernorm", "standardize"])
def test_kernel_skd_gradient_orthogonal_to_centred_logits(normalize):
    from kdfast.backends._fused import RowSoftmaxParams

    student, teacher, target = row_inputs((4, 200), torch.float64, ignore_some=False)
    params = RowSoftmaxParams(teacher="softmax", normalize=normalize, multiplier=2.0, temperature=4.0,
                              kl_weight=16.0, ce_weight=0.5)
    _, grad = cpu.row_softmax(student, teacher, target, params)
    centred = student - student.mean(dim=-1, keepdim=True)
    cosine = (grad * centred).sum(-1) / (grad.norm(dim=-1) * centred.norm(dim=-1))
    assert cosine.abs().max() < 1e-6


def test_kernel_label_out_of_range_is_an_error():
    from kdfast.backends._fused import RowSoftmaxParams

    student, teacher, _ = row_inputs((3, 5), torch.float32)
    params = RowSoftmaxParams(ce_weight=1.0)
    with pytest.raises(RuntimeError, match="outside"):
        cpu.row_softmax(student, teacher, torch.tensor([0, 5, 1]), params)
    with pytest.raises(RuntimeError, match="target"):
        cpu.feature_centre(student, teacher, torch.tensor([0, 3, 1]), torch.randn(3, 5), 1e-8)


def _defaults(name, options):
    """The public defaults of a row loss, overridden by options (what functional.py passes)."""
    import inspect

    signature = inspect.signature(getattr(reference, name))
    defaults = {key: p.default for key, p in signature.parameters.items() if p.kind == p.KEYWORD_ONLY}
    defaults.update(options)
    defaults.pop("reduction", None)
    return defaults


# --- feature–centre family (ND) -----------------------------------------------------------------


def nd_inputs(rows, dim, classes, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    teacher = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    teacher[::2] *= 3  # both branches: ‖u‖ < ‖f^t‖ on even rows, mostly > on odd ones
    teacher[1::2] *= 0.3
    centres = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    target = torch.randint(0, classes, (rows,), generator=generator)
    return u.to(dtype), teacher.to(dtype), target, centres.to(dtype)


def nd_compare(u, teacher, target, centres, options, upstream=None):
    results = {}
    for backend, cast in (("cpu", lambda x: x), ("reference", lambda x: x.double())):
        x = cast(u).detach().clone().requires_grad_()
        loss = kdfast.nd_loss(x, cast(teacher), target, cast(centres), backend=backend, **options)
        weighted = loss if upstream is None else loss * upstream
        (weighted.sum() if weighted.dim() else weighted).backward()
        results[backend] = (loss.detach(), x.grad)
    close(results["cpu"][0], results["reference"][0], LOSS_TOLERANCE[u.dtype], "nd loss")
    close(results["cpu"][1], results["reference"][1], TOLERANCE[u.dtype], "nd grad")
    assert results["cpu"][1].dtype == u.dtype


@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nd(dtype, reduction):
    u, teacher, target, centres = nd_inputs(7, 45, 5, dtype)
    target[3] = -100
    upstream = torch.randn(7) if reduction == "none" else torch.tensor(2.5)
    nd_compare(u, teacher, target, centres, dict(reduction=reduction), upstream)


@pytest.mark.parametrize("rows,dim", [(0, 8), (1, 1), (3, 17), (2, 2048)])
def test_nd_shapes(rows, dim):
    nd_compare(*nd_inputs(rows, dim, 4, torch.float64), dict())


def test_nd_tie_zero_and_all_ignored():
    u, teacher, target, centres = nd_inputs(4, 8, 3, torch.float64)
    teacher[0] = u[0].flip(0)     # ‖u‖ = ‖f^t‖ exactly: the cosine branch
    u[1] = 0.0                    # zero student row, smaller than the teacher's
    u[2] = 0.0
    teacher[2] = 0.0              # both zero: the eps clamp
    centres[target[3]] = 0.0      # zero centre: eps clamp on the centre norm
    nd_compare(u, teacher, target, centres, dict(reduction="sum"))
    x = u.clone().requires_grad_()
    loss = kdfast.nd_loss(x, teacher, torch.full((4,), -100), centres, backend="cpu")
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(x))


# --- landmark-Gram family (KDA / Nyström) -------------------------------------------------------


def gram_inputs(rows, ds, dt, landmarks, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=generator, dtype=torch.float64) * 0.4
               for shape in ((rows, ds), (rows, dt), (landmarks, ds), (landmarks, dt))]
    return [t.to(dtype) for t in tensors]


def gram_compare(tensors, options, upstream=None):
    dtype = tensors[0].dtype
    results = {}
    for backend, cast in (("cpu", lambda x: x), ("reference", lambda x: x.double())):
        x = cast(tensors[0]).detach().clone().requires_grad_()
        loss = kdfast.nystrom_loss(x, *[cast(t) for t in tensors[1:]], backend=backend, **options)
        weighted = loss if upstream is None else loss * upstream
        (weighted.sum() if weighted.dim() else weighted).backward()
        results[backend] = (loss.detach(), x.grad)
    close(results["cpu"][0], results["reference"][0], LOSS_TOLERANCE[dtype], "nystrom loss")
    close(results["cpu"][1], results["reference"][1], TOLERANCE[dtype], "nystrom grad")
    assert results["cpu"][1].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("kind,reduction", [("smooth_l1", "sum"), ("smooth_l1", "none"), ("smooth_l1", "mean"),
                                            ("sq_fro", "sum"), ("sq_fro", "mean"), ("fro", "sum")])
def test_nystrom(dtype, kind, reduction):
    tensors = gram_inputs(9, 24, 16, 5, dtype)
    upstream = torch.randn(9) if reduction == "none" else torch.tensor(2.5)
    gram_compare(tensors, dict(kind=kind, reduction=reduction), upstream)


@pytest.mark.parametrize("rows,landmarks", [(0, 3), (1, 1), (4, 0)])
def test_nystrom_shapes_and_options(rows, landmarks):
    tensors = gram_inputs(rows, 6, 5, landmarks, torch.float64)
    gram_compare(tensors, dict(kind="smooth_l1", reduction="sum", normalize=False, beta=0.5))
    gram_compare(tensors, dict(kind="sq_fro", reduction="mean"))


# --- backend choice, instruction-set builds, torch.compile --------------------------------------


def test_auto_picks_cpu_for_cpu_tensors():
    from kdfast._dispatch import resolve

    for name in cpu.LOSSES:
        assert kdfast.available_backends(name, "cpu")[0] == "cpu"
        assert resolve("auto", name, torch.device("cpu")) is cpu.LOSSES[name]
    assert cpu.unavailable_reason(torch.device("cpu")) is None
    assert cpu.unavailable_reason(torch.device("meta")) is not None


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread: nothing to split")
def test_row_loops_run_on_every_torch_thread():
    """at::parallel_for is inlined into the extension: built without OpenMP it silently runs on
    one thread (it did, until setup.py added -fopenmp)."""
    assert torch.ops.kdfast.cpu_parallel_threads_used() == torch.get_num_threads()


def test_opt_in_gradient_reuse_never_hands_out_a_live_gradient():
    """KDFAST_CPU_REUSE_GRADIENT=1: a big gradient block is handed out again only once nothing
    refers to it, and a training loop through autograd stays exact."""
    script = (
        "import torch, kdfast\n"
        "from kdfast.backends import cpu\n"
        "g = torch.Generator().manual_seed(0)\n"
        "s, t = torch.randn(1024, 8192, generator=g), torch.randn(1024, 8192, generator=g)\n"  # 32 MiB: reused size
        "op = lambda: torch.ops.kdfast.row_softmax(s, t, None, 0, 1.0, 1e-7, 4.0, 1, 1.0, 0.0, 0.0, False, 0.0, 0.0, -100)[1]\n"
        "g1 = op(); first = g1.data_ptr(); expected = g1.clone()\n"
        "g2 = op()\n"
        "assert g2.data_ptr() != first, 'a live gradient was handed out again'\n"
        "assert torch.equal(g1, expected)\n"
        "del g1\n"
        "g3 = op()\n"
        "assert g3.data_ptr() == first, 'the idle block was not reused'\n"
        "assert torch.equal(g3, expected) and torch.equal(g2, expected)\n"
        "del g2, g3\n"
        "ref = s.clone().requires_grad_(); kdfast.kd_loss(ref, t, backend='reference').backward()\n"
        "for step in range(3):\n"
        "    x = s.clone().requires_grad_()\n"
        "    kdfast.kd_loss(x, t, backend='cpu').backward()\n"
        "    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-9)\n"
    )
    env = dict(os.environ, KDFAST_CPU_REUSE_GRADIENT="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_gradient_reuse_switch_and_kept_bytes():
    """gradient_reuse() turns reuse on for a block only; kept blocks are counted and released."""
    cpu.release_kept_gradients()
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(1024, 8192, generator=generator), torch.randn(1024, 8192, generator=generator)

    def op():
        return torch.ops.kdfast.row_softmax(s, t, None, 0, 1.0, 1e-7, 4.0, 1, 1.0, 0.0, 0.0, False, 0.0, 0.0, -100)[1]

    previous = cpu.set_gradient_reuse(False)
    try:
        op()
        assert cpu.kept_gradient_bytes() == 0, "reuse is off: nothing may be kept"
        with cpu.gradient_reuse():
            first = op()
            first_address = first.data_ptr()
            kept = cpu.kept_gradient_bytes()
            assert kept >= first.numel() * first.element_size()
            del first
            assert op().data_ptr() == first_address, "the idle block was not reused"
        assert not cpu.set_gradient_reuse(False), "the previous setting was not restored"
        assert op().data_ptr() != first_address, "reuse is off again: the kept block must stay unused"
        cpu.release_kept_gradients()
        assert cpu.kept_gradient_bytes() == 0
    finally:
        cpu.set_gradient_reuse(previous)
        cpu.release_kept_gradients()


def test_every_instruction_set_build_agrees():
    """The builds this CPU can run (KDFAST_CPU_CAPABILITY lowers the choice) give the same numbers."""
    script = (
        "import torch, kdfast\n"
        "from kdfast.backends import cpu\n"
        "g = torch.Generator().manual_seed(1)\n"
        "s, t = torch.randn(3, 1003, generator=g), torch.randn(3, 1003, generator=g)\n"
        "y = torch.tensor([4, -100, 1000])\n"
        "x = s.clone().requires_grad_()\n"
        "kdfast.skd_loss(x, t, y, alpha=0.5, backend='cpu').backward()\n"
        "l = kdfast.partial_teacher_loss(s, t.bfloat16().float(), y, backend='cpu')\n"
        "u = s.bfloat16().requires_grad_()\n"
        "kdfast.nd_loss(u, t.bfloat16(), y.clamp_min(0) % 7, t[:, :].bfloat16()[[0, 2, 0, 2, 0, 2, 0]],"
        " backend='cpu').backward()\n"
        "torch.save((cpu.capability(), x.grad, l, u.grad), __import__('sys').argv[1])\n"
    )
    results = {}
    for requested in ("default", "avx2", "avx512"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kdfast_isa_{os.getpid()}_{requested}.pt")
        env = dict(os.environ, KDFAST_CPU_CAPABILITY=requested)
        subprocess.run([sys.executable, "-c", script, path], check=True, env=env)
        name, *values = torch.load(path)
        os.remove(path)
        results[name] = values
    assert "default" in results
    first = results["default"]
    for name, values in results.items():
        for a, b in zip(values, first):
            close(a, b, 1e-5 if a.dtype != torch.bfloat16 else 1e-2, f"{name} vs default")


def test_torch_compile_has_no_graph_break():
    """A step calling the public ops with backend="cpu" (kernel ops, their fake implementations, the
    autograd around them) traces into one graph. The backend module is already imported here, as
    it is after any eager call; importing it inside a compiled region would be a graph break."""
    student, teacher, target = row_inputs((4, 10), torch.float32)
    features = gram_inputs(4, 6, 5, 3, torch.float32)
    u, f_t, labels, centres = nd_inputs(4, 6, 3, torch.float32)

    def step(x, t, y, fs):
        skd = kdfast.skd_loss(x, t, y, alpha=0.5, backend="cpu")
        nd = kdfast.nd_loss(fs, f_t, labels, centres, backend="cpu")
        gram = kdfast.nystrom_loss(fs, *features[1:], backend="cpu")
        return skd + nd + gram

    x = student.clone().requires_grad_()
    fs = features[0].clone().requires_grad_()
    explanation = torch._dynamo.explain(step)(x, teacher, target, fs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, teacher, target, fs)
    loss.backward()
    x_ref, fs_ref = student.clone().requires_grad_(), features[0].clone().requires_grad_()
    ref = step(x_ref, teacher, target, fs_ref)
    ref.backward()
    close(loss.detach(), ref.detach(), 1e-6, "compiled loss")
    close(x.grad, x_ref.grad, 1e-6, "compiled grad")
    close(fs.grad, fs_ref.grad, 1e-6, "compiled feature grad")
