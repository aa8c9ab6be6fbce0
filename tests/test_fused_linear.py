"""Fused-linear KD / SKD against materialised logits + the reference loss: values and the gradients
of hidden, weight and bias, for every fused backend available here."""
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference
from kdfast import fused_linear as fused_linear_module
from kdfast.fused_linear import default_chunk_size
from kdfast.reference.divergence import transform_logits

BACKENDS = ["reference"] + [name for name in kdfast.available_backends("kd_loss", "cpu") if name != "reference"]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6),
             torch.bfloat16: dict(rtol=4e-2, atol=4e-3)}


def problem(rows=10, hidden=6, vocab=13, teacher_vocab=13, teacher_hidden=5, dtype=torch.float32, bias=True):
    student = dict(hidden=torch.randn(rows, hidden), weight=torch.randn(vocab, hidden) / hidden**0.5,
                   bias=torch.randn(vocab) if bias else None)
    teacher = dict(hidden=torch.randn(rows, teacher_hidden), weight=torch.randn(teacher_vocab, teacher_hidden),
                   bias=torch.randn(teacher_vocab) if bias else None)
    cast = lambda d: {k: None if v is None else v.to(dtype) for k, v in d.items()}
    target = torch.randint(0, vocab, (rows,))
    target[1] = -100
    return cast(student), cast(teacher), target


def own_cross_entropy_plus_padded_kd(loss_name, zs, zt, target, options):
    """α·(the reference KD/SKD term on the zero-padded logits) + (1 − α)·torch's cross entropy over
    the student's own classes (SKD: of its own normalised logits), reduced as the reference reduces
    (``mean`` divides by rows·V of the padded vocabulary)."""
    width = zt.shape[-1]
    alpha, reduction = options.get("alpha", 1.0), options.get("reduction", "batchmean")
    kd_rows = getattr(reference, loss_name)(F.pad(zs, (0, width - zs.shape[-1])), zt, target,
                                            **dict(options, alpha=1.0, reduction="none"))
    own = zs
    if loss_name == "skd_loss":
        multiplier = options.get("multiplier") or (1.0 if options["normalize"] == "standardize" else 2.0)
        own = reference.normalize_logits(zs, options["normalize"], multiplier, options.get("eps", 1e-7))
    if loss_name == "divergence_loss":  # the CE term of the transformed student logits
        own = transform_logits(zs, options.get("student_logit_scale", 1.0), options.get("student_softcap"))
    ce_rows = F.cross_entropy(own, target, ignore_index=-100, reduction="none")
    rows = alpha * kd_rows + (1 - alpha) * ce_rows
    counted = (target != -100).sum()
    return {"sum": rows.sum(), "batchmean": rows.sum() / counted, "mean": rows.sum() / (counted * width)}[reduction]


def materialised(loss_name, student, teacher, target, **options):
    """The oracle: full logits in float64 from the same (possibly low-precision) values, zero-padded
    to the larger vocabulary, then the reference loss — except that the CE term of a student with
    the smaller vocabulary is over its own classes (:func:`own_cross_entropy_plus_padded_kd`)."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in student.items() if v is not None}
    width = max(student["weight"].shape[0], teacher["weight"].shape[0])

    def logits(hidden, weight, bias):
        return hidden @ weight.T + (0 if bias is None else bias)

    zs = logits(leaves["hidden"], leaves["weight"], leaves.get("bias"))
    zt = logits(*(None if v is None else v.double() for v in (teacher["hidden"], teacher["weight"], teacher["bias"])))
    zt = F.pad(zt, (0, width - zt.shape[-1]))
    if zs.shape[-1] < width and options.get("alpha", 1.0) < 1:
        return own_cross_entropy_plus_padded_kd(loss_name, zs, zt, target, options), leaves
    loss = getattr(reference, loss_name)(F.pad(zs, (0, width - zs.shape[-1])), zt, target, **options)
    return loss, leaves


def fused(function, student, teacher, target, **options):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in student.items() if v is not None}
    loss = function(leaves["hidden"], leaves["weight"], teacher["hidden"], teacher["weight"], target,
                    student_bias=leaves.get("bias"), teacher_bias=teacher["bias"], **options)
    return loss, leaves


def compare(function, loss_name, dtype, reference_options, options, student, teacher, target, grad_output=2.5):
    ours, our_leaves = fused(function, student, teacher, target, **options, **reference_options)
    theirs, their_leaves = materialised(loss_name, student, teacher, target, **reference_options)
    (ours * grad_output).backward()
    (theirs * grad_output).backward()
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(ours.double(), theirs.detach(), **tolerance)
    for name in our_leaves:
        assert our_leaves[name].grad.dtype == dtype
        torch.testing.assert_close(our_leaves[name].grad.double(), their_leaves[name].grad, **tolerance,
                                   msg=lambda m: f"gradient of student {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_fused_linear_kd(backend, dtype, reduction):
    student, teacher, target = problem(dtype=dtype)
    compare(kdfast.fused_linear_kd_loss, "kd_loss", dtype, dict(temperature=2.0, alpha=0.6, reduction=reduction),
            dict(chunk_size=4, backend=backend), student, teacher, target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", ["layernorm", "l2", "standardize"])
def test_fused_linear_skd(backend, dtype, normalize):
    student, teacher, target = problem(dtype=dtype)
    compare(kdfast.fused_linear_skd_loss, "skd_loss", dtype, dict(alpha=0.7, normalize=normalize),
            dict(chunk_size=3, backend=backend), student, teacher, target)


DIVERGENCE_FORMS = [dict(divergence="forward_kl"), dict(divergence="reverse_kl"),
                    dict(divergence="mixed_kl", mixed_kl_weight=0.3), dict(divergence="jsd", beta=0.5),
                    dict(divergence="tvd"), dict(divergence="skew_forward_kl", skew_alpha=0.2),
                    dict(divergence="skew_reverse_kl", skew_alpha=0.2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", DIVERGENCE_FORMS, ids=lambda form: form["divergence"])
def test_fused_linear_divergence(backend, dtype, form):
    student, teacher, target = problem(dtype=dtype)
    compare(kdfast.fused_linear_divergence_loss, "divergence_loss", dtype,
            dict(temperature=2.0, alpha=0.6, **form), dict(chunk_size=4, backend=backend), student, teacher, target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(student_softcap=2.0, teacher_softcap=5.0),
    dict(student_logit_scale=0.5, teacher_logit_scale=2.0, t2_scaling=True, temperature=3.0),
    dict(student_logit_scale=1.5, student_softcap=3.0, alpha=0.5, reduction="mean"),
    dict(num_items_in_batch=23, alpha=0.5),
    dict(num_items_in_batch=torch.tensor(5.0), divergence="jsd"),
], ids=["softcap", "scale-t2", "both-ce-mean", "num-items", "num-items-tensor"])
def test_fused_linear_divergence_transforms_and_num_items(backend, options):
    student, teacher, target = problem(rows=9, vocab=11, teacher_vocab=11, dtype=torch.float64)
    student["hidden"] = student["hidden"] * 3  # logits of a few units, so the softcaps bend them
    compare(kdfast.fused_linear_divergence_loss, "divergence_loss", torch.float64, options,
            dict(chunk_size=4, backend=backend), student, teacher, target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items", [7, torch.tensor(3.0)], ids=["int", "tensor"])
def test_fused_linear_kd_skd_num_items_in_batch(backend, num_items):
    student, teacher, target = problem(dtype=torch.float64)
    compare(kdfast.fused_linear_kd_loss, "kd_loss", torch.float64, dict(alpha=0.5, num_items_in_batch=num_items),
            dict(chunk_size=4, backend=backend), student, teacher, target)
    compare(kdfast.fused_linear_skd_loss, "skd_loss", torch.float64,
            dict(normalize="layernorm", num_items_in_batch=num_items), dict(chunk_size=4, backend=backend), student,
            teacher, target)


def test_fused_linear_kd_is_forward_kl_with_t2():
    student, teacher, target = problem(dtype=torch.float64)
    args = (student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], target)
    kd = kdfast.fused_linear_kd_loss(*args, temperature=3.0, alpha=0.4, chunk_size=4)
    div = kdfast.fused_linear_divergence_loss(*args, temperature=3.0, alpha=0.4, t2_scaling=True, chunk_size=4)
    torch.testing.assert_close(kd, div, rtol=1e-12, atol=1e-12)


def test_divergence_module_equals_function():
    student, teacher, target = problem(dtype=torch.float64)
    args = (student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], target)
    module = kdfast.FusedLinearDivergenceLoss(divergence="jsd", beta=0.3, temperature=2.0, chunk_size=3)
    torch.testing.assert_close(module(*args, num_items_in_batch=4),
                               kdfast.fused_linear_divergence_loss(*args, divergence="jsd", beta=0.3, temperature=2.0,
                                                                   chunk_size=3, num_items_in_batch=4))
    with pytest.raises(ValueError, match="divergence"):
        kdfast.FusedLinearDivergenceLoss(divergence="kl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab,teacher_vocab", [(13, 17), (17, 13), (1, 1)])
def test_vocabulary_mismatch_and_odd_shapes(backend, vocab, teacher_vocab):
    student, teacher, target = problem(rows=7, hidden=3, vocab=vocab, teacher_vocab=teacher_vocab,
                                       dtype=torch.float64)
    compare(kdfast.fused_linear_kd_loss, "kd_loss", torch.float64, dict(alpha=0.5 if vocab > 1 else 1.0),
            dict(chunk_size=2, backend=backend), student, teacher, target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name,options", [("kd_loss", {}), ("skd_loss", dict(normalize="layernorm")),
                                               ("skd_loss", dict(normalize="standardize"))])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_smaller_student_vocabulary_cross_entropy_is_over_its_own_classes(backend, loss_name, options, reduction):
    """CE(z^s, y) over the student's V_s classes (Liger's convention), not over the zero-padded V
    of the KD term: the padded zeros would add their exponentials to the CE's normaliser."""
    student, teacher, target = problem(rows=8, hidden=4, vocab=5, teacher_vocab=9, dtype=torch.float64)
    function = getattr(kdfast, f"fused_linear_{loss_name}")
    options = dict(options, temperature=2.0, alpha=0.4, reduction=reduction)
    ours, our_leaves = fused(function, student, teacher, target, chunk_size=3, backend=backend, **options)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in student.items()}
    zs = leaves["hidden"] @ leaves["weight"].T + leaves["bias"]
    zt = teacher["hidden"] @ teacher["weight"].T + teacher["bias"]
    theirs = own_cross_entropy_plus_padded_kd(loss_name, zs, zt, target, options)
    torch.testing.assert_close(ours, theirs.detach(), **TOLERANCE[torch.float64])
    ours.backward()
    theirs.backward()
    for name in our_leaves:
        torch.testing.assert_close(our_leaves[name].grad, leaves[name].grad, **TOLERANCE[torch.float64])

    padded_cross_entropy = getattr(reference, loss_name)(F.pad(zs, (0, 4)), zt, target, **options)
    assert not torch.allclose(ours, padded_cross_entropy.detach(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_no_target_and_leading_dimensions(backend):
    student, teacher, _ = problem(rows=12, dtype=torch.float64, bias=False)
    shaped_student = dict(student, hidden=student["hidden"].reshape(3, 4, -1))
    shaped_teacher = dict(teacher, hidden=teacher["hidden"].reshape(3, 4, -1))
    ours, _ = fused(kdfast.fused_linear_kd_loss, shaped_student, shaped_teacher, None, backend=backend, chunk_size=5)
    theirs, _ = materialised("kd_loss", student, teacher, None)
    torch.testing.assert_close(ours, theirs.detach(), **TOLERANCE[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_is_zero_with_zero_gradients(backend):
    student, teacher, _ = problem(dtype=torch.float32)
    ignored = torch.full((10,), -100)
    loss, leaves = fused(kdfast.fused_linear_skd_loss, student, teacher, ignored, alpha=0.5, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    for leaf in leaves.values():
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_gradient_but_hidden_does(backend):
    student, teacher, target = problem(dtype=torch.float64, bias=False)
    hidden = student["hidden"].clone().requires_grad_()
    loss = kdfast.fused_linear_kd_loss(hidden, student["weight"], teacher["hidden"], teacher["weight"], target,
                                       backend=backend, chunk_size=4)
    loss.backward()
    theirs, leaves = materialised("kd_loss", student, teacher, target)
    theirs.backward()
    torch.testing.assert_close(hidden.grad, leaves["hidden"].grad, **TOLERANCE[torch.float64])
    assert student["weight"].grad is None


def test_module_equals_function():
    student, teacher, target = problem(dtype=torch.float64)
    module = kdfast.FusedLinearSKDLoss(alpha=0.5, chunk_size=4)
    expected = kdfast.fused_linear_skd_loss(student["hidden"], student["weight"], teacher["hidden"],
                                            teacher["weight"], target, student_bias=student["bias"],
                                            teacher_bias=teacher["bias"], alpha=0.5, chunk_size=4)
    got = module(student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], target,
                 student_bias=student["bias"], teacher_bias=teacher["bias"])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_errors_name_the_argument():
    student, teacher, target = problem()
    args = (student["hidden"], student["weight"], teacher["hidden"], teacher["weight"])
    with pytest.raises(ValueError, match="reduction"):
        kdfast.fused_linear_kd_loss(*args, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        kdfast.fused_linear_kd_loss(*args, chunk_size=0)
    with pytest.raises(ValueError, match="student_weight"):
        kdfast.fused_linear_kd_loss(student["hidden"], student["weight"][:, :-1], teacher["hidden"], teacher["weight"])
    with pytest.raises(ValueError, match="teacher_hidden"):
        kdfast.fused_linear_kd_loss(student["hidden"], student["weight"], teacher["hidden"][:-1], teacher["weight"])
    with pytest.raises(ValueError, match="student_bias"):
        kdfast.fused_linear_kd_loss(*args, student_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="target"):
        kdfast.fused_linear_kd_loss(*args, torch.full((10,), 13))
    with pytest.raises(TypeError, match="teacher_weight"):
        kdfast.fused_linear_kd_loss(student["hidden"], student["weight"], teacher["hidden"], teacher["weight"].double())
    with pytest.raises(ValueError, match="target is required"):
        kdfast.fused_linear_kd_loss(*args, alpha=0.5)
    with pytest.raises(TypeError, match="ignore_index"):
        kdfast.fused_linear_kd_loss(*args, target, ignore_index="x")
    with pytest.raises(ValueError, match="ignore_index"):
        kdfast.fused_linear_skd_loss(*args, target, ignore_index=2**70)
    with pytest.raises(ValueError, match="multiplier"):
        kdfast.fused_linear_skd_loss(*args, multiplier=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_slices_of_a_chunk(backend, monkeypatch):
    """The row kernel runs on slices of each chunk (its gradient written over the slice's logits):
    slices and chunks that do not divide the rows, every form with softcap and a CE term."""
    monkeypatch.setattr(fused_linear_module, "KERNEL_ROWS", 3)
    student, teacher, target = problem(rows=23, vocab=11, teacher_vocab=14, dtype=torch.float64)
    for form in DIVERGENCE_FORMS[:4]:
        compare(kdfast.fused_linear_divergence_loss, "divergence_loss", torch.float64,
                dict(alpha=0.7, student_softcap=4.0, **form), dict(chunk_size=8, backend=backend), student, teacher,
                target)


def test_default_chunk_size_rule():
    assert default_chunk_size(65536, 32000, 4096) == 8192      # N / ceil(V / H), a power of two
    assert default_chunk_size(8192, 128256, 4096) == 512
    assert default_chunk_size(4096, 32000, 1024) == 512        # at least 512 rows for efficient GEMMs
    assert default_chunk_size(5, 100, 1000) == 5                # never more than N
    assert default_chunk_size(0, 10, 10) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native", [False, True], ids=["fp32-gemm", "native-gemm"])
def test_low_precision_gemm_choice_on_cpu(monkeypatch, dtype, native):
    """CPUs without bf16/fp16 matrix instructions run the chunk GEMMs in fp32, the others natively;
    both paths (the second forced here) match the oracle."""
    monkeypatch.setattr(fused_linear_module, "_cpu_has_matrix_unit", lambda _dtype: native)
    assert fused_linear_module.matmul_dtype(dtype, torch.device("cpu")) == (dtype if native else torch.float32)
    assert fused_linear_module.matmul_dtype(torch.float32, torch.device("cpu")) == torch.float32
    assert fused_linear_module.matmul_dtype(dtype, torch.device("meta")) == dtype
    student, teacher, target = problem(dtype=dtype)
    tolerance = TOLERANCE[torch.bfloat16]
    ours, our_leaves = fused(kdfast.fused_linear_skd_loss, student, teacher, target, alpha=0.5, chunk_size=4)
    theirs, their_leaves = materialised("skd_loss", student, teacher, target, alpha=0.5)
    (ours * 1.5).backward()
    (theirs * 1.5).backward()
    torch.testing.assert_close(ours.double(), theirs.detach(), **tolerance)
    for name in our_leaves:
        assert our_leaves[name].grad.dtype == dtype
        torch.testing.assert_close(our_leaves[name].grad.double(), their_leaves[name].grad, **tolerance)
