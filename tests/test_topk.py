"""Top-k teacher divergences: the reference (kdfast/reference/topk.py) against an independent float64
implementation written here from probabilities, float64 gradcheck; the fused path (kdfast/topk.py)
against the reference in fp64, fp32 and bf16 for every tail × divergence; the checks the spec asks
of every top-k implementation (k = V equals the dense forward KL, re-temperaturing, truncate and
bucket identities, padding, rows summing to 0, num_items_in_batch); argument errors; and the
fused-linear twin against materialised logits."""
import math
import warnings

import pytest
import torch

import kdfast
from kdfast.reference.topk import topk_divergence_loss as reference_topk

F64 = torch.float64
INF = math.inf

#: every allowed (divergence, tail, extra options) combination
COMBOS = [
    ("forward_kl", "renormalize", {}), ("jsd", "renormalize", {"beta": 0.3}),
    ("reverse_kl", "renormalize", {"reverse_kl_floor": -100.0}),
    ("mixed_kl", "renormalize", {"reverse_kl_floor": -20.0, "mixed_kl_weight": 0.3}),
    ("forward_kl", "renormalize_both", {}), ("reverse_kl", "renormalize_both", {}),
    ("mixed_kl", "renormalize_both", {}), ("jsd", "renormalize_both", {"beta": 0.7}),
    ("forward_kl", "bucket", {}), ("reverse_kl", "bucket", {}), ("mixed_kl", "bucket", {"mixed_kl_weight": 0.6}),
    ("jsd", "bucket", {}), ("forward_kl", "truncate", {}),
]
IDS = [f"{d}-{t}" for d, t, _ in COMBOS]


def teacher_topk(teacher_logits, k, t_gen=1.0, pad=0):
    """(indices, log-probs) of the top-k of softmax(z^t/T_gen); the last ``pad`` entries of each row are
    padding (−inf) whose index repeats a real index of the row."""
    log_q = torch.log_softmax(teacher_logits / t_gen, dim=-1)
    logprobs, indices = log_q.topk(k, dim=-1)
    if pad:
        logprobs[:, k - pad:] = -INF
        indices[:, k - pad:] = indices[:, :1]
    return indices, logprobs


def case(n=5, vocab=16, k=5, dtype=F64, t_gen=1.0, pad=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vocab, generator=g, dtype=F64) * 1.5).to(dtype)
    teacher = torch.randn(n, vocab, generator=g, dtype=F64) * 2
    indices, logprobs = teacher_topk(teacher, k, t_gen, pad)
    return student, indices, logprobs.to(dtype), teacher


def options(divergence, tail, extra, temperature=1.0, t_gen=None):
    return dict(divergence=divergence, tail=tail, temperature=temperature,
                teacher_temperature=t_gen if tail.startswith("renormalize") else None, **extra)


# --- the independent implementation: one row at a time, from probabilities -----------------------

def _kl(x, y):
    keep = x > 0
    x, y = x[keep], y[keep]
    if bool((y == 0).any()):
        return INF
    return float((x * torch.log(x / y)).sum())


def _divergence(p, q, divergence, beta=0.5, mixed_kl_weight=0.5):
    if divergence == "forward_kl":
        return _kl(q, p)
    if divergence == "reverse_kl":
        return _kl(p, q)
    if divergence == "mixed_kl":
        return mixed_kl_weight * _kl(q, p) + (1 - mixed_kl_weight) * _kl(p, q)
    m = beta * q + (1 - beta) * p
    return beta * _kl(q, m) + (1 - beta) * _kl(p, m)


def naive_row(z, indices, ell, divergence, tail, temperature=1.0, teacher_temperature=None, beta=0.5,
              mixed_kl_weight=0.5, reverse_kl_floor=None):
    t_gen = temperature if teacher_temperature is None else teacher_temperature
    p = torch.softmax(z / temperature, dim=-1)
    real = ell > -INF
    support, ell = indices[real], ell[real]
    args = dict(beta=beta, mixed_kl_weight=mixed_kl_weight)
    if tail == "truncate":
        return float((ell.exp() * (ell - p[support].log())).sum())
    if tail == "bucket":
        tail_mask = torch.ones_like(p, dtype=torch.bool)
        tail_mask[support] = False
        q_bins = torch.cat([ell.exp(), (1 - ell.exp().sum()).clamp_min(0).reshape(1)])
        p_bins = torch.cat([p[support], p[tail_mask].sum().reshape(1)])
        return _divergence(p_bins, q_bins, divergence, **args)
    q_tilde = torch.softmax(ell * t_gen / temperature, dim=-1)
    if tail == "renormalize_both":
        return _divergence(p[support] / p[support].sum(), q_tilde, divergence, **args)
    q = torch.zeros_like(p)
    q[support] = q_tilde
    if divergence in ("forward_kl", "jsd"):
        return _divergence(p, q, divergence, **args)
    t = torch.full_like(p, reverse_kl_floor)
    t[support] = q_tilde.log()
    keep = p > 0
    reverse = float((p[keep] * (p[keep].log() - t[keep])).sum())
    if divergence == "reverse_kl":
        return reverse
    return mixed_kl_weight * _kl(q, p) + (1 - mixed_kl_weight) * reverse


def run(backend, student, indices, logprobs, target=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kdfast.topk_divergence_loss(student, indices, logprobs, target, backend=backend, **kwargs)


def loss_and_grad(backend, student, indices, logprobs, target=None, upstream=None, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    loss = run(backend, student, indices, logprobs, target, **kwargs)
    (loss if upstream is None else loss * upstream).sum().backward()
    return loss.detach(), student.grad


# --- the reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("divergence,tail,extra", COMBOS, ids=IDS)
@pytest.mark.parametrize("temperature,t_gen", [(1.0, None), (2.5, 1.5)])
def test_reference_matches_naive(divergence, tail, extra, temperature, t_gen):
    if tail in ("bucket", "truncate"):
        t_gen = None
    student, indices, logprobs, _ = case(t_gen=t_gen or temperature)
    student[0, indices[0, 0]] = -INF if divergence == "jsd" else student[0, 0]   # a masked student entry in K
    student[1, :] = torch.where(torch.arange(16) == 7, -INF, student[1])          # masked wherever it lands
    kwargs = options(divergence, tail, extra, temperature, t_gen)
    loss = reference_topk(student, indices, logprobs, reduction="none", **kwargs)
    for row in range(student.shape[0]):
        expected = naive_row(student[row], indices[row], logprobs[row], **kwargs)
        if math.isinf(expected):
            assert loss[row] == expected
        else:
            assert float(loss[row]) == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("divergence,tail,extra", COMBOS, ids=IDS)
def test_reference_gradcheck(divergence, tail, extra):
    student, indices, logprobs, _ = case(n=3, vocab=7, k=3)
    kwargs = options(divergence, tail, extra, 1.3, 0.8)
    if tail in ("bucket", "truncate"):
        kwargs["teacher_temperature"] = None
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: reference_topk(z, indices, logprobs, reduction="sum", **kwargs),
                                    (student,))


# --- the fused path against the reference ------------------------------------------------------

TOLERANCES = {F64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6),
              torch.bfloat16: dict(rtol=3e-2, atol=3e-3)}


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence,tail,extra", COMBOS, ids=IDS)
def test_fused_matches_reference(divergence, tail, extra, dtype):
    student, indices, logprobs, _ = case(n=7, vocab=40, k=6, dtype=dtype, pad=2)
    target = torch.randint(0, 40, (7,))
    target[2] = -100
    student[2, 3] = INF                                  # an ignored row may hold anything
    logprobs[2, 0] = math.nan
    upstream = torch.rand(7, dtype=F64).to(dtype) + 0.5
    kwargs = options(divergence, tail, extra)
    ref = loss_and_grad("reference", student, indices, logprobs, target, upstream, reduction="none", **kwargs)
    fused = loss_and_grad("auto", student, indices, logprobs, target, upstream, reduction="none", **kwargs)
    torch.testing.assert_close(fused[0], ref[0], **TOLERANCES[dtype])
    torch.testing.assert_close(fused[1], ref[1], **TOLERANCES[dtype])
    assert fused[0][2] == 0 and bool((fused[1][2] == 0).all())


VARIANTS = [dict(temperature=2.0, t2_scaling=True), dict(alpha=0.6), dict(alpha=0.0),
            dict(temperature=0.7, alpha=0.4, student_softcap=2.5, student_logit_scale=1.5),
            dict(student_logit_scale=0.5, reduction="mean"), dict(reduction="sum")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("divergence,tail,extra", COMBOS, ids=IDS)
def test_fused_options_match_reference(divergence, tail, extra, variant):
    student, indices, logprobs, _ = case(n=5, vocab=24, k=5, pad=1, seed=3)
    target = torch.randint(0, 24, (5,))
    kwargs = dict(options(divergence, tail, extra, variant.get("temperature", 1.0),
                          0.6 if tail.startswith("renormalize") else None), **variant)
    ref = loss_and_grad("reference", student, indices, logprobs, target, **kwargs)
    fused = loss_and_grad("cpu", student, indices, logprobs, target, **kwargs)
    torch.testing.assert_close(fused[0], ref[0], **TOLERANCES[F64])
    torch.testing.assert_close(fused[1], ref[1], **TOLERANCES[F64])


@pytest.mark.parametrize("divergence,tail,extra", COMBOS, ids=IDS)
def test_rows_sum_to_zero_and_no_grad_loss(divergence, tail, extra):
    student, indices, logprobs, _ = case(n=6, vocab=30, k=7, pad=2, seed=5)
    kwargs = options(divergence, tail, extra)
    loss, grad = loss_and_grad("auto", student, indices, logprobs, **kwargs)
    assert grad.sum(dim=-1).abs().max() < 1e-14
    with torch.no_grad():
        assert run("auto", student, indices, logprobs, **kwargs) == loss
    if tail != "truncate":
        assert bool((run("auto", student, indices, logprobs, reduction="none", **kwargs) >= -1e-12).all())


@pytest.mark.parametrize("tail", ["renormalize", "renormalize_both", "bucket", "truncate"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_nan_and_undefined_rows(tail, backend):
    student, indices, logprobs, _ = case(n=6, vocab=20, k=4, pad=1)
    student[0, 11] = math.nan                            # NaN student entry (maybe outside K)
    logprobs[1, 1] = math.nan                            # NaN teacher value
    logprobs[2, :] = -INF                                # no real teacher entry
    student[3, :] = -INF                                 # every student logit masked
    loss, grad = loss_and_grad(backend, student, indices, logprobs, reduction="none", tail=tail)
    undefined = [0, 1, 3] + ([2] if tail.startswith("renormalize") else [])
    for row in range(6):
        if row in undefined:
            assert loss[row].isnan() and bool(grad[row].isnan().all()), row
        else:
            assert loss[row].isfinite() and bool(grad[row].isfinite().all()), row
    if backend == "auto":
        ref = loss_and_grad("reference", student, indices, logprobs, reduction="none", tail=tail)
        torch.testing.assert_close(loss, ref[0], equal_nan=True)
        torch.testing.assert_close(grad, ref[1], equal_nan=True)


@pytest.mark.parametrize("divergence,tail,extra", COMBOS, ids=IDS)
def test_padding_changes_nothing(divergence, tail, extra):
    student, indices, logprobs, _ = case(n=4, vocab=20, k=4, pad=0, seed=7)
    # three padding entries: one repeating a real index, one repeating another, one out of range
    padded_indices = torch.cat([indices, indices[:, :2], torch.full((4, 1), 999)], dim=-1)
    padded_logprobs = torch.cat([logprobs, torch.full((4, 3), -INF, dtype=F64)], dim=-1)
    kwargs = options(divergence, tail, extra)
    for backend in ("reference", "auto"):
        plain = loss_and_grad(backend, student, indices, logprobs, reduction="none", **kwargs)
        padded = loss_and_grad(backend, student, padded_indices, padded_logprobs, reduction="none", **kwargs)
        torch.testing.assert_close(padded[0], plain[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(padded[1], plain[1], rtol=1e-12, atol=1e-14)


# --- the spec's checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("tail", ["renormalize", "renormalize_both", "bucket", "truncate"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_k_equal_vocab_is_the_dense_forward_kl(tail, backend):
    student, indices, logprobs, teacher = case(n=4, vocab=12, k=12, pad=0)
    z = student.detach().clone().requires_grad_(True)
    expected = kdfast.divergence_loss(z, teacher, divergence="forward_kl", backend="reference")
    expected.backward()
    loss, grad = loss_and_grad(backend, student, indices, logprobs, tail=tail)
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(grad, z.grad, rtol=1e-10, atol=1e-13)
    if tail == "renormalize":                            # any T: the re-tempered teacher is softmax(z^t/T)
        z.grad = None
        expected = kdfast.divergence_loss(z.detach(), teacher, temperature=2.5, backend="reference")
        loss = run(backend, student, indices, logprobs, tail=tail, temperature=2.5, teacher_temperature=1.0)
        assert float(loss) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("tail", ["renormalize", "renormalize_both"])
def test_retemperaturing_is_exact(tail):
    student, _, _, teacher = case(n=4, vocab=20, k=5)
    stored_indices, stored = teacher_topk(teacher, 5, t_gen=0.7)
    at_t = torch.log_softmax(teacher / 2.0, dim=-1).gather(-1, stored_indices)
    for backend in ("reference", "auto"):
        a = run(backend, student, stored_indices, stored, tail=tail, temperature=2.0, teacher_temperature=0.7)
        b = run(backend, student, stored_indices, at_t, tail=tail, temperature=2.0)
        assert float(a) == pytest.approx(float(b), rel=1e-12)
    for other in ("bucket", "truncate"):
        with pytest.raises(ValueError, match="teacher_temperature"):
            run("auto", student, stored_indices, stored, tail=other, temperature=2.0, teacher_temperature=0.7)


def test_truncate_identity_and_sign():
    student, indices, logprobs, _ = case(n=5, vocab=20, k=4, pad=0)
    for backend in ("reference", "auto"):
        truncated = run(backend, student, indices, logprobs, tail="truncate", reduction="none")
        renormalized = run(backend, student, indices, logprobs, tail="renormalize", reduction="none")
        mass = logprobs.exp().sum(-1)
        torch.testing.assert_close(truncated, mass * (renormalized + mass.log()), rtol=1e-12, atol=1e-14)
    # the student equal to the teacher renormalised over K: (a) is 0, (c) is Q_K·log Q_K < 0
    at_teacher = torch.full_like(student, -INF).scatter(1, indices, logprobs)
    for backend in ("reference", "auto"):
        loss = run(backend, at_teacher, indices, logprobs, tail="truncate", reduction="none")
        assert bool((loss < 0).all())
        torch.testing.assert_close(loss, mass * mass.log(), rtol=1e-12, atol=1e-14)


def test_bucket_special_rows():
    student, indices, logprobs, teacher = case(n=3, vocab=10, k=10, pad=0)
    for backend in ("reference", "auto"):
        bucket = run(backend, student, indices, logprobs, tail="bucket", reduction="none")
        assert bool(bucket.isfinite().all())
        torch.testing.assert_close(bucket, run(backend, student, indices, logprobs, reduction="none"))
    # a fully masked student tail against a real teacher tail: a support violation
    student, indices, logprobs, _ = case(n=2, vocab=10, k=3, pad=0)
    masked = torch.full_like(student, -INF).scatter(1, indices, student.gather(1, indices))
    for backend in ("reference", "auto"):
        assert bool((run(backend, masked, indices, logprobs, tail="bucket", reduction="none") == INF).all())


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "reverse_kl"])
def test_bucket_tiny_student_tail_in_fp32(divergence):
    # the student's tail holds ~1e-8 of its mass: summed directly, not as 1 − Σ_K p
    vocab, k = 64, 4
    student = torch.full((2, vocab), -18.0, dtype=F64)
    student[:, :k] = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=F64)
    indices = torch.arange(k).expand(2, k).contiguous()
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.05], dtype=F64)).expand(2, k).contiguous()
    expected = run("reference", student, indices, logprobs, tail="bucket", divergence=divergence, reduction="none")
    got = run("auto", student.float(), indices, logprobs.float(), tail="bucket", divergence=divergence,
              reduction="none")
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_renormalize_is_the_bins_formula_with_an_empty_teacher_tail(divergence):
    student, indices, logprobs, _ = case(n=4, vocab=20, k=5, pad=0)
    loss = run("auto", student, indices, logprobs, divergence=divergence, reduction="none", beta=0.4)
    p = torch.softmax(student, -1)
    q_tilde = torch.softmax(logprobs, -1)
    for row in range(4):
        p_k = p[row, indices[row]]
        p_bins = torch.cat([p_k, (1 - p_k.sum()).reshape(1)])
        q_bins = torch.cat([q_tilde[row], torch.zeros(1, dtype=F64)])
        assert float(loss[row]) == pytest.approx(_divergence(p_bins, q_bins, divergence, beta=0.4), rel=1e-10)


def test_num_items_in_batch_and_micro_batches():
    student, indices, logprobs, _ = case(n=8, vocab=20, k=4)
    target = torch.randint(0, 20, (8,))
    target[[1, 6]] = -100
    full = loss_and_grad("auto", student, indices, logprobs, target, tail="bucket", num_items_in_batch=11)
    total = run("reference", student, indices, logprobs, target, tail="bucket", reduction="sum")
    assert float(full[0]) == pytest.approx(float(total) / 11, rel=1e-12)
    parts = [loss_and_grad("auto", student[s], indices[s], logprobs[s], target[s], tail="bucket",
                           num_items_in_batch=torch.tensor(11.0)) for s in (slice(0, 3), slice(3, 8))]
    assert float(parts[0][0] + parts[1][0]) == pytest.approx(float(full[0]), rel=1e-12)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full[1])


def test_leading_dimensions_and_module():
    student, indices, logprobs, _ = case(n=6, vocab=20, k=4)
    module = kdfast.TopKDivergenceLoss(divergence="jsd", tail="bucket", reduction="none")
    out = module(student.reshape(2, 3, 20), indices.reshape(2, 3, 4), logprobs.reshape(2, 3, 4))
    assert out.shape == (2, 3)
    torch.testing.assert_close(out.reshape(-1), run("auto", student, indices, logprobs, divergence="jsd",
                                                    tail="bucket", reduction="none"))


@pytest.mark.parametrize("call,match", [
    (dict(divergence="tvd"), "divergence"),
    (dict(tail="zero"), "tail"),
    (dict(tail="bucket", teacher_temperature=2.0), "teacher_temperature"),
    (dict(tail="truncate", divergence="jsd"), "truncate"),
    (dict(divergence="reverse_kl"), "reverse_kl_floor"),
    (dict(divergence="mixed_kl", reverse_kl_floor=math.inf), "reverse_kl_floor"),
    (dict(beta=1.5), "beta"),
    (dict(teacher_temperature=0.0), "teacher_temperature"),
    (dict(reduction="sum", num_items_in_batch=4), "num_items_in_batch"),
    (dict(backend="gpu"), "backend"),
    (dict(alpha=0.5), "target"),
])
def test_bad_options_raise(call, match):
    student, indices, logprobs, _ = case()
    with pytest.raises((ValueError, TypeError), match=match):
        kdfast.topk_divergence_loss(student, indices, logprobs, **call)
    if "backend" not in call and "alpha" not in call and "num_items_in_batch" not in call:
        with pytest.raises((ValueError, TypeError), match=match):
            kdfast.TopKDivergenceLoss(**call)


def test_bad_teacher_tensors_raise():
    student, indices, logprobs, _ = case(n=3, vocab=10, k=3, pad=0)
    with pytest.raises(TypeError, match="teacher_topk_indices"):
        kdfast.topk_divergence_loss(student, indices.double(), logprobs)
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        kdfast.topk_divergence_loss(student, indices, logprobs[:, :2])
    with pytest.raises(ValueError, match="teacher_topk_indices"):
        kdfast.topk_divergence_loss(student, indices[:2], logprobs[:2])
    bad = indices.clone()
    bad[1, 0] = 10
    with pytest.raises(ValueError, match="teacher_topk_indices holds an index outside"):
        kdfast.topk_divergence_loss(student, bad, logprobs)
    repeated = indices.clone()
    repeated[0, 1] = repeated[0, 0]
    with pytest.raises(ValueError, match="repeats an index"):
        kdfast.topk_divergence_loss(student, repeated, logprobs, backend="reference")


# --- fused linear ---------------------------------------------------------------------------------

FUSED_LINEAR_COMBOS = [COMBOS[0], COMBOS[2], COMBOS[3], COMBOS[5], COMBOS[7], COMBOS[8], COMBOS[11], COMBOS[12]]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("divergence,tail,extra", FUSED_LINEAR_COMBOS, ids=[f"{d}-{t}" for d, t, _ in FUSED_LINEAR_COMBOS])
def test_fused_linear_matches_materialised_logits(divergence, tail, extra, dtype):
    g = torch.Generator().manual_seed(1)
    n, hidden_size, vocab, k = 23, 12, 40, 5
    hidden = torch.randn(n, hidden_size, generator=g, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=dtype) * 0.5
    bias = torch.randn(vocab, generator=g, dtype=dtype)
    indices, logprobs = teacher_topk(torch.randn(n, vocab, generator=g, dtype=F64) * 2, k, pad=1)
    logprobs = logprobs.to(dtype)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[[4, 9]] = -100
    kwargs = dict(options(divergence, tail, extra, 1.0 if tail in ("bucket", "truncate") else 1.6, 0.9),
                  alpha=0.8, student_softcap=4.0, t2_scaling=True)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss = fn(*leaves)
        (2.5 * loss).backward()
        return [loss.detach()] + [leaf.grad for leaf in leaves]

    expected = grads(lambda h, w, b: reference_topk(h @ w.T + b, indices, logprobs, target, **kwargs))
    for reduction in ("batchmean",):
        got = grads(lambda h, w, b: kdfast.fused_linear_topk_divergence_loss(
            h, w, indices, logprobs, target, student_bias=b, chunk_size=7, reduction=reduction, **kwargs))
        tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=2e-4, atol=2e-6)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **tolerance)


def test_fused_linear_reductions_module_and_no_grad():
    g = torch.Generator().manual_seed(2)
    n, hidden_size, vocab, k = 10, 6, 30, 4
    hidden = torch.randn(2, 5, hidden_size, generator=g, dtype=F64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=F64)
    indices, logprobs = teacher_topk(torch.randn(n, vocab, generator=g, dtype=F64), k)
    indices, logprobs = indices.reshape(2, 5, k), logprobs.reshape(2, 5, k)
    for reduction, num_items in (("sum", None), ("mean", None), ("batchmean", 7)):
        fused = kdfast.fused_linear_topk_divergence_loss(hidden, weight, indices, logprobs, tail="bucket",
                                                         reduction=reduction, num_items_in_batch=num_items)
        expected = reference_topk((hidden @ weight.T).reshape(n, vocab), indices.reshape(n, k),
                                  logprobs.reshape(n, k), tail="bucket", reduction=reduction,
                                  num_items_in_batch=num_items)
        assert float(fused) == pytest.approx(float(expected), rel=1e-12)
    module = kdfast.FusedLinearTopKDivergenceLoss(tail="bucket", reduction="sum")
    with torch.no_grad():
        assert float(module(hidden, weight, indices, logprobs)) == pytest.approx(
            float(kdfast.fused_linear_topk_divergence_loss(hidden, weight, indices, logprobs, tail="bucket",
                                                           reduction="sum", backend="reference")), rel=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        kdfast.fused_linear_topk_divergence_loss(hidden, weight, indices, logprobs, reduction="none")
    with pytest.raises(ValueError, match="student_weight"):
        kdfast.fused_linear_topk_divergence_loss(hidden, weight[:, :3], indices, logprobs)
