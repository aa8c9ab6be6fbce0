"""The reference of the LLM-distillation divergences (kdfast/reference/divergence.py) against an
independent float64 implementation written here straight from the spec's per-entry definitions
(llm-distillation spec §1–§5, §7, §9), float64 gradcheck of every form, and the spec's invariants
("Checks every implementation must pass" 1–7, 14, 17)."""
import math
import types
import warnings

import pytest
import torch

import kdfast
from kdfast import _dispatch, reference
from kdfast.reference.divergence import DIVERGENCES

F64 = torch.float64
INF = math.inf
#: each form with a non-default parameter value, so the parameters are exercised too
FORMS = [
    ("forward_kl", {}), ("reverse_kl", {}), ("mixed_kl", {"mixed_kl_weight": 0.3}), ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("tvd", {}), ("skew_forward_kl", {"skew_alpha": 0.25}),
    ("skew_reverse_kl", {"skew_alpha": 0.1}), ("skew_forward_kl", {"skew_alpha": 0.0}),
]
FORM_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'default'}" for name, options in FORMS]


# --- the independent implementation: probabilities, then Σ over x > 0 of x·log(x/y) -------------

def _kl(x, y):
    """KL(x ‖ y) of one row from probabilities: terms with x = 0 are absent, x > 0 = y gives +inf."""
    keep = x > 0
    x, y = x[keep], y[keep]
    if bool((y == 0).any()):
        return INF
    return float((x * torch.log(x / y)).sum())


def naive_divergence(p, q, divergence, beta=0.5, skew_alpha=0.1, mixed_kl_weight=0.5):
    if divergence == "forward_kl":
        return _kl(q, p)
    if divergence == "reverse_kl":
        return _kl(p, q)
    if divergence == "mixed_kl":
        w = mixed_kl_weight
        return (w * _kl(q, p) if w > 0 else 0.0) + ((1 - w) * _kl(p, q) if w < 1 else 0.0)
    if divergence == "jsd":
        if beta == 0:
            return _kl(q, p)
        if beta == 1:
            return _kl(p, q)
        m = beta * q + (1 - beta) * p
        return beta * _kl(q, m) + (1 - beta) * _kl(p, m)
    if divergence == "tvd":
        return 0.5 * float((p - q).abs().sum())
    if divergence == "skew_forward_kl":
        return _kl(q, skew_alpha * q + (1 - skew_alpha) * p)
    if divergence == "skew_reverse_kl":
        return _kl(p, (1 - skew_alpha) * q + skew_alpha * p)
    raise AssertionError(divergence)


def naive_transform(z, scale, softcap):
    z = z * scale
    if softcap is None:
        return z
    return torch.where(torch.isinf(z), z, softcap * torch.tanh(z / softcap))


def naive_loss_rows(s, t, target=None, *, divergence="forward_kl", temperature=1.0, t2_scaling=False, alpha=1.0,
                    student_logit_scale=1.0, student_softcap=None, teacher_logit_scale=1.0, teacher_softcap=None,
                    **form):
    """Per-row losses (reduction "none"), computed row by row."""
    s = naive_transform(s.double(), student_logit_scale, student_softcap)
    t = naive_transform(t.double(), teacher_logit_scale, teacher_softcap)
    out = []
    for n in range(s.shape[0]):
        p = torch.softmax(s[n] / temperature, -1)
        q = torch.softmax(t[n] / temperature, -1)
        value = alpha * (temperature**2 if t2_scaling else 1.0) * naive_divergence(p, q, divergence, **form) \
            if alpha > 0 else 0.0
        if alpha < 1:
            value += (1 - alpha) * -float(torch.log_softmax(s[n], -1)[target[n]])
        out.append(value)
    return torch.tensor(out, dtype=F64)


def logits(*shape, scale=3.0):
    return scale * torch.randn(*shape, dtype=F64)


def masked_pair(rows=4, classes=9, pattern="both"):
    """Logits with −inf entries: "both" (the same columns on both sides), "teacher" (teacher only),
    "student" (student only), "mixed" (all three kinds in one row)."""
    s, t = logits(rows, classes), logits(rows, classes)
    if pattern in ("both", "mixed"):
        s[:, 1] = t[:, 1] = -INF
        s[0, 5] = t[0, 5] = -INF
    if pattern in ("teacher", "mixed"):
        t[:, 3] = -INF
    if pattern in ("student", "mixed"):
        s[:, 6] = -INF
    return s, t


# --- values against the independent implementation ----------------------------------------------

@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("config", [
    dict(temperature=1.0),
    dict(temperature=2.5, t2_scaling=True),
    dict(temperature=0.7, student_logit_scale=0.5, student_softcap=10.0, teacher_logit_scale=2.0),
    dict(temperature=2.0, teacher_softcap=4.0, alpha=0.6),
], ids=["T1", "T2.5-t2", "scale-softcap", "teacher-softcap-alpha"])
def test_every_form_matches_the_independent_implementation(form, config):
    name, options = form
    s, t = logits(5, 11, scale=6.0), logits(5, 11, scale=6.0)
    target = torch.randint(0, 11, (5,))
    got = kdfast.divergence_loss(s, t, target, divergence=name, reduction="none", **options, **config)
    expected = naive_loss_rows(s, t, target, divergence=name, **options, **config)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("pattern", ["both", "teacher", "student", "mixed"])
def test_masked_vocabularies_follow_the_support_table(form, pattern):
    """Spec §0.3: finite where the table says so, +inf for a support violation, never NaN; the
    values (infinite ones included) equal the independent implementation's."""
    name, options = form
    s, t = masked_pair(pattern=pattern)
    s.requires_grad_(True)
    got = kdfast.divergence_loss(s, t, divergence=name, reduction="none", temperature=1.5, **options)
    expected = naive_loss_rows(s.detach(), t, divergence=name, temperature=1.5, **options)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    student_violation = name in ("forward_kl", "mixed_kl") or (name == "jsd" and options["beta"] == 0) or \
        (name == "skew_forward_kl" and options["skew_alpha"] == 0)
    teacher_violation = name in ("reverse_kl", "mixed_kl") or (name == "jsd" and options["beta"] == 1)
    infinite = (pattern in ("student", "mixed") and student_violation) or \
        (pattern in ("teacher", "mixed") and teacher_violation)
    assert bool(torch.isposinf(got).all()) if infinite else bool(got.isfinite().all())
    if not infinite:  # a finite loss has a finite gradient, 0 at the student's masked entries
        got.sum().backward()
        assert s.grad.isfinite().all()
        assert (s.grad[s.detach() == -INF] == 0).all()


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_a_column_masked_on_both_sides_changes_nothing(form):
    name, options = form
    s, t = logits(3, 8), logits(3, 8)
    s[:, 2] = t[:, 2] = -INF
    keep = [j for j in range(8) if j != 2]
    full = s.clone().requires_grad_(True)
    short = s[:, keep].clone().requires_grad_(True)
    loss_full = kdfast.divergence_loss(full, t, divergence=name, temperature=2.0, **options)
    loss_short = kdfast.divergence_loss(short, t[:, keep], divergence=name, temperature=2.0, **options)
    torch.testing.assert_close(loss_full, loss_short, rtol=1e-13, atol=1e-13)
    loss_full.backward(), loss_short.backward()
    torch.testing.assert_close(full.grad[:, keep], short.grad, rtol=1e-12, atol=1e-13)
    assert (full.grad[:, 2] == 0).all()


# --- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_float64_gradcheck_of_every_form(form):
    name, options = form
    s, t = masked_pair(rows=3, classes=6, pattern="both")
    s.requires_grad_(True)
    target = torch.tensor([0, 2, -100])
    for config in (dict(temperature=1.7, t2_scaling=True),
                   dict(temperature=0.8, alpha=0.7, student_logit_scale=0.5, student_softcap=3.0,
                        teacher_softcap=5.0)):
        assert torch.autograd.gradcheck(
            lambda x: kdfast.divergence_loss(x, t, target, divergence=name, reduction="none", **options, **config),
            (s,))


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_gradient_rows_sum_to_zero(form):
    """Spec §0.2: Σ_j ∂L/∂z^s_j = 0 per row (without transforms: a softcap's chain rule breaks it)."""
    name, options = form
    s, t = masked_pair(rows=5, classes=10, pattern="both")
    s.requires_grad_(True)
    kdfast.divergence_loss(s, t, divergence=name, temperature=1.3, **options).backward()
    torch.testing.assert_close(s.grad.sum(-1), torch.zeros(5, dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_zero_loss_and_gradient_when_the_student_is_the_teacher(form):
    """Spec check 3: every form is 0 with a zero gradient at z^s = z^t + c (TVD at c = 0 only)."""
    name, options = form
    t = logits(4, 12)
    t[:, 3] = -INF
    for shift in (0.0,) if name == "tvd" else (0.0, 1.7, -40.0):
        s = (t + shift).requires_grad_(True)
        loss = kdfast.divergence_loss(s, t, divergence=name, temperature=2.0, t2_scaling=True, **options)
        loss.backward()
        assert abs(loss.item()) < 1e-12
        assert float(s.grad.abs().max()) < 1e-12


# --- invariants ---------------------------------------------------------------------------------

def test_jsd_endpoints_are_the_plain_kls_and_the_family_is_discontinuous_there():
    s, t = logits(6, 20), logits(6, 20)
    for options in (dict(temperature=1.0), dict(temperature=3.0, t2_scaling=True)):
        fkl = kdfast.divergence_loss(s, t, divergence="forward_kl", reduction="none", **options)
        rkl = kdfast.divergence_loss(s, t, divergence="reverse_kl", reduction="none", **options)
        assert torch.equal(kdfast.divergence_loss(s, t, divergence="jsd", beta=0.0, reduction="none", **options), fkl)
        assert torch.equal(kdfast.divergence_loss(s, t, divergence="jsd", beta=1.0, reduction="none", **options), rkl)
    s, t = torch.randn(6, 20, dtype=F64), torch.randn(6, 20, dtype=F64)  # spec check 2: std-1 logits
    fkl = kdfast.divergence_loss(s, t, divergence="forward_kl", reduction="none")
    rkl = kdfast.divergence_loss(s, t, divergence="reverse_kl", reduction="none")
    small = 1e-7
    torch.testing.assert_close(kdfast.divergence_loss(s, t, divergence="jsd", beta=small, reduction="none") / small,
                               fkl, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        kdfast.divergence_loss(s, t, divergence="jsd", beta=1 - small, reduction="none") / small, rkl,
        rtol=0, atol=1e-5)


def test_bounds():
    """Spec check 5: 0 ≤ JSD_β ≤ h(β), 0 ≤ skew forms ≤ −log α, 0 ≤ TVD ≤ 1."""
    s, t = logits(64, 30, scale=8.0), logits(64, 30, scale=8.0)
    for beta in (0.1, 0.5, 0.9):
        jsd = kdfast.divergence_loss(s, t, divergence="jsd", beta=beta, reduction="none")
        assert (jsd >= 0).all() and (jsd <= -beta * math.log(beta) - (1 - beta) * math.log(1 - beta) + 1e-12).all()
    for name in ("skew_forward_kl", "skew_reverse_kl"):
        for skew in (0.1, 0.5):
            value = kdfast.divergence_loss(s, t, divergence=name, skew_alpha=skew, reduction="none")
            assert (value >= 0).all() and (value <= -math.log(skew) + 1e-12).all()
    tvd = kdfast.divergence_loss(s, t, divergence="tvd", reduction="none")
    assert (tvd >= 0).all() and (tvd <= 1).all()


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_kd_loss_is_forward_kl_with_t2_scaling(alpha):
    s, t = logits(2, 3, 17), logits(2, 3, 17)
    target = torch.randint(0, 17, (2, 3))
    target[0, 1] = -100
    for reduction in ("batchmean", "sum", "mean", "none"):
        a = s.clone().requires_grad_(True)
        b = s.clone().requires_grad_(True)
        kd = kdfast.kd_loss(a, t, target, temperature=3.0, alpha=alpha, reduction=reduction)
        div = kdfast.divergence_loss(b, t, target, divergence="forward_kl", temperature=3.0, t2_scaling=True,
                                     alpha=alpha, reduction=reduction)
        torch.testing.assert_close(div, kd.to(F64), rtol=1e-13, atol=1e-13)
        kd.sum().backward(), div.sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-13)


def test_t2_scaling_multiplies_loss_and_gradient_by_t_squared():
    s, t = logits(4, 9), logits(4, 9)
    for name in DIVERGENCES:
        a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        plain = kdfast.divergence_loss(a, t, divergence=name, temperature=2.5)
        scaled = kdfast.divergence_loss(b, t, divergence=name, temperature=2.5, t2_scaling=True)
        plain.backward(), scaled.backward()
        torch.testing.assert_close(scaled, 6.25 * plain, rtol=1e-14, atol=0)
        torch.testing.assert_close(b.grad, 6.25 * a.grad, rtol=1e-13, atol=1e-15)


def test_softcap_transforms():
    """Spec check 14: c → ∞ (1e6) equals no softcap; a −inf logit stays masked after the cap."""
    s, t = logits(4, 10), logits(4, 10)
    for name in DIVERGENCES:
        capped = kdfast.divergence_loss(s, t, divergence=name, student_softcap=1e6, teacher_softcap=1e6)
        torch.testing.assert_close(capped, kdfast.divergence_loss(s, t, divergence=name), rtol=1e-9, atol=1e-12)
    s[:, 4] = t[:, 4] = -INF
    keep = [j for j in range(10) if j != 4]
    options = dict(student_softcap=2.0, teacher_softcap=3.0, student_logit_scale=1.5)
    for name in DIVERGENCES:
        torch.testing.assert_close(kdfast.divergence_loss(s, t, divergence=name, **options),
                                   kdfast.divergence_loss(s[:, keep], t[:, keep], divergence=name, **options),
                                   rtol=1e-13, atol=1e-13)


# --- special rows, reductions, num_items_in_batch ------------------------------------------------

@pytest.mark.parametrize("name", DIVERGENCES)
def test_ignored_rows_have_zero_loss_and_gradient_and_nan_rows_are_whole_row_nan(name):
    s, t = logits(5, 7), logits(5, 7)
    target = torch.tensor([1, -100, 3, -100, 0])
    s[1, 2] = math.nan
    t[3, :] = -INF  # an ignored row may hold anything
    s[3, 0] = INF
    s[4, 5] = math.nan  # a counted NaN row
    s.requires_grad_(True)
    per_row = kdfast.divergence_loss(s, t, target, divergence=name, alpha=0.5, reduction="none")
    assert per_row[1] == 0 and per_row[3] == 0 and per_row[4].isnan()
    assert per_row[[0, 2]].isfinite().all()
    per_row.sum().backward()
    assert (s.grad[[1, 3]] == 0).all() and s.grad[4].isnan().all() and s.grad[[0, 2]].isfinite().all()
    clean = s.detach()[[0, 2]]
    torch.testing.assert_close(kdfast.divergence_loss(s.detach()[:4], t[:4], target[:4], divergence=name, alpha=0.5),
                               kdfast.divergence_loss(clean, t[[0, 2]], target[[0, 2]], divergence=name, alpha=0.5))


def test_reductions():
    s, t = logits(2, 3, 8), logits(2, 3, 8)
    target = torch.randint(0, 8, (2, 3))
    target[1, 0] = -100
    for name in DIVERGENCES:
        per_row = kdfast.divergence_loss(s, t, target, divergence=name, reduction="none")
        assert per_row.shape == (2, 3) and per_row[1, 0] == 0
        total = per_row.sum()
        torch.testing.assert_close(kdfast.divergence_loss(s, t, target, divergence=name, reduction="sum"), total)
        torch.testing.assert_close(kdfast.divergence_loss(s, t, target, divergence=name), total / 5)
        torch.testing.assert_close(kdfast.divergence_loss(s, t, target, divergence=name, reduction="mean"),
                                   total / (5 * 8))
    empty = kdfast.divergence_loss(s[:0], t[:0])
    assert empty == 0


def test_num_items_in_batch_replaces_the_batchmean_divisor_and_micro_batches_sum_to_the_batch():
    s, t = logits(8, 10), logits(8, 10)
    target = torch.randint(0, 10, (8,))
    target[[2, 5]] = -100
    counted = int((target != -100).sum())
    for name in ("reverse_kl", "jsd"):
        full_s = s.clone().requires_grad_(True)
        full = kdfast.divergence_loss(full_s, t, target, divergence=name, alpha=0.8)
        full.backward()
        for items in (float(counted), counted, torch.tensor(counted), torch.tensor(float(counted), dtype=F64)):
            micro_s = s.clone().requires_grad_(True)
            loss = sum(kdfast.divergence_loss(micro_s[i:i + 3], t[i:i + 3], target[i:i + 3], divergence=name,
                                              alpha=0.8, num_items_in_batch=items) for i in (0, 3, 6))
            loss.backward()
            torch.testing.assert_close(loss, full, rtol=1e-14, atol=0)
            torch.testing.assert_close(micro_s.grad, full_s.grad, rtol=1e-13, atol=1e-16)
        module = kdfast.DivergenceLoss(divergence=name, alpha=0.8)
        torch.testing.assert_close(module(s, t, target, num_items_in_batch=2.5),
                                   kdfast.divergence_loss(s, t, target, divergence=name, alpha=0.8,
                                                          reduction="sum") / 2.5)


def test_half_inputs_compute_in_float32():
    s, t = logits(3, 6).half(), logits(3, 6).half()
    for name in DIVERGENCES:
        got = kdfast.divergence_loss(s, t, divergence=name, beta=0.4)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), kdfast.divergence_loss(s.double(), t.double(), divergence=name,
                                                                        beta=0.4), rtol=1e-5, atol=1e-6)


# --- the public surface -------------------------------------------------------------------------

def test_module_equals_the_functional_and_the_reference():
    s, t = logits(2, 4, 9), logits(2, 4, 9)
    target = torch.randint(0, 9, (2, 4))
    options = dict(divergence="skew_reverse_kl", skew_alpha=0.2, temperature=1.5, t2_scaling=True, alpha=0.9,
                   student_softcap=5.0, teacher_logit_scale=0.5)
    functional = kdfast.divergence_loss(s, t, target, **options)
    torch.testing.assert_close(kdfast.DivergenceLoss(**options)(s, t, target), functional)
    torch.testing.assert_close(reference.divergence_loss(s.reshape(-1, 9), t.reshape(-1, 9), target.reshape(-1),
                                                         **options), functional)
    assert kdfast.divergence_loss is kdfast.functional.divergence_loss


def test_auto_falls_back_to_the_reference_without_a_warning_when_a_backend_lacks_the_loss(monkeypatch):
    """A fused backend that does not implement divergence_loss (yet) is no fallback to report."""
    fused = types.SimpleNamespace(LOSSES={"kd_loss": lambda *a, **k: "fused"}, unavailable_reason=lambda d: None)
    monkeypatch.setattr(_dispatch, "_LOADED", {**_dispatch._LOADED, "cpu": fused})
    monkeypatch.setattr(_dispatch, "_LOAD_FAILURES", {})
    monkeypatch.setattr(_dispatch, "_FALLBACK_REPORTED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.resolve("auto", "divergence_loss", torch.device("cpu")) is reference.divergence_loss
        kdfast.divergence_loss(logits(2, 5), logits(2, 5))
    assert _dispatch.resolve("auto", "kd_loss", torch.device("cpu"))() == "fused"
    available = kdfast.available_backends("divergence_loss", "cpu")
    assert "cpu" not in available and "reference" in available
    with pytest.raises(RuntimeError, match="does not implement divergence_loss"):
        _dispatch.resolve("cpu", "divergence_loss", torch.device("cpu"))


S, T = torch.randn(3, 5), torch.randn(3, 5)


@pytest.mark.parametrize("options,argument", [
    (dict(divergence="kl"), "divergence"),
    (dict(beta=1.5), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(skew_alpha=1.0), "skew_alpha"),
    (dict(mixed_kl_weight=2.0), "mixed_kl_weight"),
    (dict(temperature=0.0), "temperature"),
    (dict(t2_scaling=1), "t2_scaling"),
    (dict(alpha=1.2), "alpha"),
    (dict(alpha=0.5), "target"),
    (dict(reduction="avg"), "reduction"),
    (dict(num_items_in_batch=0), "num_items_in_batch"),
    (dict(num_items_in_batch=torch.tensor([4.0])), "num_items_in_batch"),
    (dict(num_items_in_batch=4, reduction="sum"), "num_items_in_batch"),
    (dict(num_items_in_batch="4"), "num_items_in_batch"),
    (dict(student_logit_scale=0.0), "student_logit_scale"),
    (dict(teacher_logit_scale=-1.0), "teacher_logit_scale"),
    (dict(student_softcap=0.0), "student_softcap"),
    (dict(teacher_softcap=math.inf), "teacher_softcap"),
    (dict(ignore_index=1.5), "ignore_index"),
    (dict(backend="gpu"), "backend"),
])
def test_bad_arguments_name_the_argument(options, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        kdfast.divergence_loss(S, T, **options)


def test_bad_tensors_name_the_tensor():
    with pytest.raises(ValueError, match="teacher_logits"):
        kdfast.divergence_loss(S, T[:, :4])
    with pytest.raises(TypeError, match="teacher_logits"):
        kdfast.divergence_loss(S, T.double())
    with pytest.raises(ValueError, match="target"):
        kdfast.divergence_loss(S, T, torch.tensor([0, 1, 7]))


@pytest.mark.parametrize("options,argument", [
    (dict(divergence="js"), "divergence"), (dict(beta=2.0), "beta"), (dict(skew_alpha=1.0), "skew_alpha"),
    (dict(mixed_kl_weight=-0.5), "mixed_kl_weight"), (dict(t2_scaling="yes"), "t2_scaling"),
    (dict(temperature=-1.0), "temperature"), (dict(student_softcap=-3.0), "student_softcap"),
    (dict(teacher_logit_scale=0.0), "teacher_logit_scale"), (dict(reduction="avg"), "reduction"),
    (dict(backend="gpu"), "backend"),
])
def test_module_constructor_rejects_bad_hyper_parameters_naming_them(options, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        kdfast.DivergenceLoss(**options)
