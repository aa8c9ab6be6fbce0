"""What exists on one backend only: the CPU kernels' backend choice, thread use, gradient-block
reuse, instruction-set builds and torch.compile tracing; the Triton backend's block heuristic,
availability rules, custom-op registration (opcheck), torch.compile tracing and allocations.
Every loss's values and gradients on every backend are in test_rowsoftmax, test_feature_centre and
test_landmark_gram."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kdfast
from kdfast import reference

from backends import ALL

#: C = 1 with a partial teacher takes log(0) = −inf on purpose (no other class); numpy says so
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

CPU, TRITON = ALL[1], ALL[2]
needs_cpu = pytest.mark.skipif(CPU.skip is not None, reason=CPU.skip or "")
needs_triton = pytest.mark.skipif(TRITON.skip is not None, reason=TRITON.skip or "")
DEVICE = TRITON.device


def close(actual, expected, tolerance, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance, msg=what)


def row_inputs(shape, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype).to(device)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype).to(device)
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator).to(device)
    if target.numel() > 1:
        target.view(-1)[1] = -100
    return student, teacher, target


def nd_inputs(rows, dim, classes, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    teacher = torch.randn(rows, dim, generator=generator, dtype=torch.float64) * 2
    centres = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    return u.to(dtype).to(device), teacher.to(dtype).to(device), centres.to(dtype).to(device)


def gram_inputs(rows, ds, dt, m, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=generator, dtype=torch.float64) * 0.4).to(dtype).to(device)
            for shape in ((rows, ds), (rows, dt), (m, ds), (m, dt))]


# --- cpu ----------------------------------------------------------------------------------------


@needs_cpu
def test_auto_picks_cpu_for_cpu_tensors():
    from kdfast.backends import cpu

    from kdfast._dispatch import resolve

    for name in cpu.LOSSES:
        assert kdfast.available_backends(name, "cpu")[0] == "cpu"
        assert resolve("auto", name, torch.device("cpu")) is cpu.LOSSES[name]
    assert cpu.unavailable_reason(torch.device("cpu")) is None
    assert cpu.unavailable_reason(torch.device("meta")) is not None


@needs_cpu
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread: nothing to split")
def test_row_loops_run_on_every_torch_thread():
    """at::parallel_for is inlined into the extension: built without OpenMP it silently runs on
    one thread (it did, until setup.py added -fopenmp)."""
    assert torch.ops.kdfast.cpu_parallel_threads_used() == torch.get_num_threads()


@needs_cpu
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


@needs_cpu
def test_gradient_reuse_switch_and_kept_bytes():
    """gradient_reuse() turns reuse on for a block only; kept blocks are counted and released."""
    from kdfast.backends import cpu

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


@needs_cpu
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


#: every divergence code of the CPU op with an inner weight where the form has one
DIVERGENCE_FORMS = [("reverse_kl", 1, 0.0), ("mixed_kl", 2, 0.3), ("jsd", 3, 0.4), ("tvd", 4, 0.0),
                    ("skew_forward_kl", 5, 0.2), ("skew_reverse_kl", 6, 0.3)]


@needs_cpu
def test_divergence_options_are_checked_by_the_cpu_op():
    """A bad code, a weight outside (0, 1) for a weighted form, and a non-softmax teacher are errors
    naming the argument, not silent garbage."""
    s, t, _ = row_inputs((2, 7))
    base = [s, t, None, 0, 1.0, 1e-7, 1.0, 1, 1.0, 0.0, 0.0, False, 0.0, 1e-6, -100, True, False]
    for code in (-1, 7):
        with pytest.raises(RuntimeError, match=f"unknown divergence code {code}"):
            torch.ops.kdfast.row_softmax(*base, code, 0.0)
    for code in (2, 3, 5, 6):
        for param in (0.0, 1.0, -0.5, 1.5, float("nan")):
            with pytest.raises(RuntimeError, match="divergence_param must lie strictly inside"):
                torch.ops.kdfast.row_softmax(*base, code, param)
    partial = list(base)
    partial[2], partial[7] = torch.zeros(2, dtype=torch.long), 2
    with pytest.raises(RuntimeError, match="needs the softmax teacher"):
        torch.ops.kdfast.row_softmax(*partial, 1, 0.0)
    # defaults: the forward KL, as before the arguments existed
    assert torch.equal(torch.ops.kdfast.row_softmax(*base)[1], torch.ops.kdfast.row_softmax(*base, 0, 0.0)[1])


@needs_cpu
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1-shared-exp-row", "T2"])
@pytest.mark.parametrize("form", DIVERGENCE_FORMS, ids=[form[0] for form in DIVERGENCE_FORMS])
def test_divergence_with_normalisation_and_ce(form, temperature):
    """Paths the public losses do not reach: a general divergence under SKD's layernorm map with a
    CE term (at T = 1 the CE shares the KL's exp row), against float64 autograd of the composition."""
    from kdfast.backends import cpu
    from kdfast.backends._contract import RowSoftmaxParams
    from kdfast.reference.divergence import divergence_rows

    name, _, weight = form
    student, teacher, target = row_inputs((4, 45), torch.float64)
    kappa, eps, kl_w, ce_w = 2.0, 1e-7, 1.7, 0.4
    params = RowSoftmaxParams(normalize="layernorm", multiplier=kappa, eps=eps, temperature=temperature,
                              teacher="softmax", kl_weight=kl_w, ce_weight=ce_w, divergence=name,
                              divergence_param=weight)
    loss, grad = cpu.row_softmax(student, teacher, target, params)

    def layernorm(z):
        return kappa * (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + eps)

    x = student.clone().requires_grad_()
    h, ht = layernorm(x), layernorm(teacher)
    weights = dict(mixed_kl_weight=weight, beta=weight, skew_alpha=weight)
    div = divergence_rows(torch.log_softmax(h / temperature, -1), torch.log_softmax(ht / temperature, -1), name,
                          **weights)
    valid = target != -100
    ce = -torch.log_softmax(h, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    want = torch.where(valid, kl_w * div + ce_w * ce, torch.zeros_like(div))
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    close(loss, want.detach(), 1e-10, f"{name} loss")
    close(grad, want_grad, 1e-10, f"{name} grad")


@needs_cpu
def test_every_instruction_set_build_agrees_on_divergences():
    """The divergence pass's SIMD loops (and their scalar tails: 1003 columns) in every build this CPU
    can run, with masked entries on either side, against the portable build."""
    script = (
        "import math, torch\n"
        "from kdfast.backends import cpu\n"
        "from kdfast.backends._contract import RowSoftmaxParams\n"
        "g = torch.Generator().manual_seed(2)\n"
        "s, t = torch.randn(3, 1003, generator=g) * 3, torch.randn(3, 1003, generator=g) * 3\n"
        "s[0, 990:] = -math.inf\n"
        "t[1, 5:400] = -math.inf\n"
        "out = []\n"
        f"for name, _, w in {[(f[0], f[1], f[2]) for f in DIVERGENCE_FORMS]!r}:\n"
        "    p = RowSoftmaxParams(teacher='softmax', temperature=1.5, kl_weight=2.0, divergence=name,"
        " divergence_param=w)\n"
        "    out += list(cpu.row_softmax(s, t, None, p))\n"
        "    out += list(cpu.row_softmax(s.bfloat16(), t.bfloat16(), None, p))\n"
        "torch.save((cpu.capability(), out), __import__('sys').argv[1])\n"
    )
    results = {}
    for requested in ("default", "avx2", "avx512"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kdfast_isa_div_{os.getpid()}_{requested}.pt")
        env = dict(os.environ, KDFAST_CPU_CAPABILITY=requested)
        subprocess.run([sys.executable, "-c", script, path], check=True, env=env)
        name, values = torch.load(path)
        os.remove(path)
        results[name] = values
    first = results["default"]
    for name, values in results.items():
        for a, b in zip(values, first):
            assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a.isnan(), b.isnan()), f"{name}: special values"
            finite = torch.isfinite(b)
            close(a[finite], b[finite], 1e-5 if a.dtype != torch.bfloat16 else 1e-2, f"{name} vs default")


@needs_cpu
def test_torch_compile_has_no_graph_break():
    """A step calling the public ops with backend="cpu" (kernel ops, their fake implementations, the
    autograd around them) traces into one graph. The backend module is already imported here, as
    it is after any eager call; importing it inside a compiled region would be a graph break."""
    student, teacher, target = row_inputs((4, 10), torch.float32)
    features = gram_inputs(4, 6, 5, 3, torch.float32)
    u, f_t, centres = nd_inputs(4, 6, 3, torch.float32)
    labels = torch.tensor([0, 2, 1, 0])

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


# --- triton -------------------------------------------------------------------------------------


@needs_triton
def test_row_block_heuristic():
    """Whole rows up to MAX_SINGLE_BLOCK in one block; longer rows streamed; a forced block wins."""
    from kdfast.backends.triton._common import MAX_SINGLE_BLOCK, STREAM_BLOCK, row_block
    assert row_block(1) == (1, True)
    assert row_block(1001) == (1024, True)
    assert row_block(MAX_SINGLE_BLOCK) == (MAX_SINGLE_BLOCK, True)
    assert row_block(MAX_SINGLE_BLOCK + 1) == (STREAM_BLOCK, False)
    assert row_block(256_000) == (STREAM_BLOCK, False)
    assert row_block(100, 16) == (16, False)


@needs_triton
def test_unavailable_reason(monkeypatch):
    from kdfast.backends import triton as triton_backend

    assert triton_backend.unavailable_reason(torch.device("cuda")) is None
    assert "CUDA" in triton_backend.unavailable_reason(torch.device("meta"))
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setattr(triton_backend, "INTERPRETED", True)
    assert triton_backend.unavailable_reason(torch.device("cpu")) is None


@needs_triton
def test_dispatch_names_triton_for_every_loss():
    from kdfast.backends import triton as triton_backend

    for name in set(reference.LOSSES) - reference.REFERENCE_ONLY:
        assert name in triton_backend.LOSSES
    if torch.cuda.is_available():
        assert "triton" in kdfast.available_backends("kd_loss", "cuda")


@needs_triton
def test_custom_ops_opcheck(device=DEVICE):
    """The ops are registered in the kdfast namespace with a working fake (meta) implementation."""
    student, teacher, target = row_inputs((3, 10), device=device)
    torch.library.opcheck(torch.ops.kdfast.triton_row_softmax.default,
                          (student, teacher, target, "layernorm", "softmax", 2.0, 1e-7, 4.0, 8.0, 0.5, 0.0, False,
                           0.0, 1e-6, -100, 0))
    u, ft, centers = nd_inputs(3, 12, 4, device=device)
    torch.library.opcheck(torch.ops.kdfast.triton_feature_centre.default,
                          (u, ft, torch.tensor([0, -100, 1], device=device), centers, 1e-8, -100, 0))
    fs, ft, cs, ct = gram_inputs(3, 8, 6, 5, device=device)
    gram = (ft @ ct.T).contiguous()
    scale = torch.tensor(0.25, device=device)
    torch.library.opcheck(torch.ops.kdfast.triton_landmark_gram.default, (fs, gram, cs, scale, "smooth_l1", 1.0, 256))


@needs_triton
def test_no_graph_break_and_compiled_gradients(device=DEVICE):
    """torch._dynamo sees the whole loss (kernel launch, autograd.Function, reduction) as one
    graph, and aot_eager compilation reproduces the eager values and gradients. Traced on the
    backend's loss functions: the public ``kdfast.*`` entry points add the dispatcher, whose
    ``importlib.import_module`` is a dynamo graph break of its own (outside this backend)."""
    torch._dynamo.reset()
    student, teacher, target = row_inputs((3, 10), device=device)
    student.requires_grad_(True)
    u, ft, centers = nd_inputs(3, 12, 10, device=device)
    fs, gt, cs, ct = gram_inputs(3, 8, 6, 5, device=device)
    from kdfast.backends import triton as triton_backend

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


@needs_triton
def test_no_row_by_class_temporaries_besides_the_gradient():
    """The row-softmax op allocates exactly its two outputs: the [N] loss rows and the [N, C]
    gradient; no [N, C] fp32 loss or probability buffer. Counted with the profiler's memory events
    on CPU tensors (the interpreter's own numpy copies are not torch allocations)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts CPU allocations; on CUDA use torch.cuda.max_memory_allocated in the benchmark")
    from kdfast.backends import _fused
    from kdfast.backends.triton.rowsoftmax import row_softmax

    rows, classes = 4, 2000
    student, teacher, target = row_inputs((rows, classes), torch.bfloat16)
    params, _, _ = _fused.row_softmax_params("skd_loss", temperature=4.0, alpha=0.5, reduction="sum",
                                             ignore_index=-100, normalize="layernorm", multiplier=2.0, eps=1e-7)
    row_softmax(student, teacher, target, params)  # warm the kernel cache outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        row_softmax(student, teacher, target, params)
    sizes = [event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage > 0]
    big = [size for size in sizes if size >= rows * classes * student.element_size()]
    assert big == [rows * classes * student.element_size()], sizes  # the bf16 gradient, nothing else
