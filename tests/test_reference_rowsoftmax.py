"""The reference of the row-softmax family: parity with the independent per-row implementation
(1e-10 in value and gradient), float64 gradcheck of every loss and reduction, spec §8 V1, V2, V5."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.reference import normalize_logits, partial_teacher_log_target

import naive

REDUCTIONS = ["none", "sum", "mean", "batchmean"]
TIGHT = dict(rtol=1e-10, atol=1e-10)


def logits(rows=6, classes=9, scale=3.0):
    return scale * torch.randn(rows, classes, dtype=torch.float64)


def labels(rows=6, classes=9, ignored=(2,)):
    y = torch.randint(0, classes, (rows,))
    for i in ignored:
        y[i] = -100
    return y


def value_and_grad(loss_fn, student, *args, **kwargs):
    student = student.clone().requires_grad_()
    loss = loss_fn(student, *args, **kwargs)
    loss.sum().backward()  # "none": the gradient of each row's loss, as the naive version returns
    return loss.detach(), student.grad


def assert_matches_naive(ours, theirs):
    (value, grad), (naive_value, naive_grad) = ours, theirs
    torch.testing.assert_close(value, torch.as_tensor(naive_value, dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(grad, torch.as_tensor(naive_grad, dtype=torch.float64), **TIGHT)


# ---------------------------------------------------------------------------------------------
# Parity with the independent implementation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_naive(reduction, alpha, temperature):
    zs, zt, y = logits(), logits(), labels()
    ours = value_and_grad(kdfast.kd_loss, zs, zt, y, temperature=temperature, alpha=alpha, reduction=reduction)
    theirs = naive.kd(zs.numpy(), zt.numpy(), y.numpy(), T=temperature, alpha=alpha, reduction=reduction)
    assert_matches_naive(ours, theirs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", ["layernorm", "l2", "standardize"])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_skd_matches_naive(reduction, normalize, alpha):
    zs, zt, y = logits(), logits(), labels()
    options = dict(temperature=4.0, multiplier=2.0, alpha=alpha, eps=1e-7, normalize=normalize)
    ours = value_and_grad(kdfast.skd_loss, zs, zt, y, reduction=reduction, **options)
    theirs = naive.skd(zs.numpy(), zt.numpy(), y.numpy(), T=4.0, kappa=2.0, alpha=alpha, eps=1e-7, how=normalize,
                       reduction=reduction)
    assert_matches_naive(ours, theirs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (3.0, 1.0), (2.0, 0.2)])
def test_partial_teacher_matches_naive(reduction, temperature, alpha):
    zs, zt, y = logits(), logits(), labels()
    ours = value_and_grad(kdfast.partial_teacher_loss, zs, zt, y, temperature=temperature, alpha=alpha,
                          reduction=reduction)
    theirs = naive.partial_teacher(zs.numpy(), zt.numpy(), y.numpy(), T=temperature, alpha=alpha,
                                   reduction=reduction)
    assert_matches_naive(ours, theirs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_smoothing_matches_naive_and_torch(reduction):
    zs, y = logits(), labels()
    ours = value_and_grad(kdfast.label_smoothing_loss, zs, y, smoothing=0.2, reduction=reduction)
    assert_matches_naive(ours, naive.label_smoothing(zs.numpy(), y.numpy(), eps=0.2, reduction=reduction))
    if reduction in ("none", "sum", "mean"):
        torch_value = F.cross_entropy(zs, y, label_smoothing=0.2, reduction=reduction, ignore_index=-100)
        torch.testing.assert_close(ours[0], torch_value, **TIGHT)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reweighted_ce_matches_naive(reduction):
    zs, zt, y = logits(), logits(), labels()
    ours = value_and_grad(kdfast.reweighted_ce_loss, zs, zt, y, alpha=0.7, reduction=reduction)
    assert_matches_naive(ours, naive.reweighted_ce(zs.numpy(), zt.numpy(), y.numpy(), alpha=0.7,
                                                   reduction=reduction))


def test_leading_dimensions_are_rows():
    zs, zt = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 3))
    flat = kdfast.skd_loss(zs.reshape(6, 7), zt.reshape(6, 7), y.reshape(6), alpha=0.5, reduction="none")
    shaped = kdfast.skd_loss(zs, zt, y, alpha=0.5, reduction="none")
    assert shaped.shape == (2, 3)
    torch.testing.assert_close(shaped.reshape(6), flat)
    torch.testing.assert_close(kdfast.skd_loss(zs, zt, y, alpha=0.5), flat.mean())


# ---------------------------------------------------------------------------------------------
# float64 gradcheck of every loss and every reduction
# ---------------------------------------------------------------------------------------------

ROW_LOSSES = {
    "kd": lambda s, t, y, r: kdfast.kd_loss(s, t, y, alpha=0.6, reduction=r),
    "skd-layernorm": lambda s, t, y, r: kdfast.skd_loss(s, t, y, alpha=0.6, reduction=r),
    "skd-l2": lambda s, t, y, r: kdfast.skd_loss(s, t, y, alpha=0.6, normalize="l2", reduction=r),
    "skd-standardize": lambda s, t, y, r: kdfast.skd_loss(s, t, y, alpha=0.6, normalize="standardize",
                                                          multiplier=1.0, reduction=r),
    "partial-teacher": lambda s, t, y, r: kdfast.partial_teacher_loss(s, t, y, temperature=2.0, reduction=r),
    "label-smoothing": lambda s, t, y, r: kdfast.label_smoothing_loss(s, y, reduction=r),
}
# reweighted_ce_loss is left out on purpose: its weight is a stop-gradient (spec §4a), so its
# gradient is by definition not the derivative of its value; test_reweighted_ce_matches_naive
# checks that gradient against the closed form w·(p − e_y) instead.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ROW_LOSSES)
def test_gradcheck(name, reduction):
    zs = logits(4, 5).requires_grad_()
    zt, y = logits(4, 5), labels(4, 5, ignored=(1,))
    loss = ROW_LOSSES[name]
    assert torch.autograd.gradcheck(lambda s: loss(s, zt, y, reduction), (zs,))


# ---------------------------------------------------------------------------------------------
# V1: KD base
# ---------------------------------------------------------------------------------------------

def test_v1_kd_gradient_closed_form():
    zs, zt = logits(), logits()
    _, grad = value_and_grad(kdfast.kd_loss, zs, zt, temperature=3.0)
    expected = 3.0 / zs.shape[0] * (F.softmax(zs / 3.0, -1) - F.softmax(zt / 3.0, -1))
    torch.testing.assert_close(grad, expected, **TIGHT)


def test_v1_kd_shift_invariance():
    zt = logits()
    zs = zt + 5.0
    loss, grad = value_and_grad(kdfast.kd_loss, zs, zt)
    assert abs(loss.item()) < 1e-12 and grad.abs().max() < 1e-12


def test_v1_kd_high_temperature_limit():
    zs, zt = logits(), logits()
    per_row = kdfast.kd_loss(zs, zt, temperature=1000.0, reduction="none")
    centred = (zs - zs.mean(1, keepdim=True)) - (zt - zt.mean(1, keepdim=True))
    torch.testing.assert_close(per_row, centred.pow(2).sum(1) / (2 * zs.shape[1]), rtol=1e-2, atol=0)


def test_v1_batchmean_unchanged_by_duplicating_the_batch():
    zs, zt = logits(), logits()
    once = kdfast.kd_loss(zs, zt)
    twice = kdfast.kd_loss(torch.cat([zs, zs]), torch.cat([zt, zt]))
    torch.testing.assert_close(once, twice, **TIGHT)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # torch's notice that its 'mean' may change
def test_kd_mean_is_kl_div_mean_and_batchmean_is_kl_div_batchmean():
    zs, zt, T = logits(), logits(), 2.0
    log_p, q = F.log_softmax(zs / T, -1), F.softmax(zt / T, -1)
    for reduction in ("mean", "batchmean", "sum"):
        expected = T * T * F.kl_div(log_p, q, reduction=reduction)
        torch.testing.assert_close(kdfast.kd_loss(zs, zt, temperature=T, reduction=reduction), expected, **TIGHT)


# ---------------------------------------------------------------------------------------------
# V2: SKD
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["layernorm", "standardize"])
def test_v2_affine_invariance(normalize):
    zs, zt, y = logits(), logits(), labels()
    base = kdfast.skd_loss(zs, zt, y, alpha=0.5, normalize=normalize)
    moved = kdfast.skd_loss(3.0 * zs - 7.0, 0.5 * zt + 2.0, y, alpha=0.5, normalize=normalize)
    torch.testing.assert_close(base, moved, rtol=1e-6, atol=1e-7)


def test_v2_l2_is_scale_invariant_only():
    zs, zt = logits(), logits()
    base = kdfast.skd_loss(zs, zt, normalize="l2")
    torch.testing.assert_close(base, kdfast.skd_loss(4.0 * zs, zt, normalize="l2"), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(base, kdfast.skd_loss(zs + 3.0, zt, normalize="l2"))


def test_v2_gradient_rows_sum_to_zero_and_are_tangent():
    zs, zt, y = logits(), logits(), labels(ignored=())
    _, grad = value_and_grad(kdfast.skd_loss, zs, zt, y, alpha=0.5)
    assert grad.sum(1).abs().max() < 1e-12
    centred = zs - zs.mean(1, keepdim=True)
    # tangent up to eps/(var + eps) ≈ 1e-8 here (spec §1b)
    assert F.cosine_similarity(grad, centred, dim=1).abs().max() < 1e-6


def test_v2_reduces_to_kd_on_layer_normed_inputs():
    zs, zt, kappa, T = logits(), logits(), 2.0, 4.0
    ln = lambda z: F.layer_norm(z, z.shape[-1:], eps=1e-7)
    expected = kappa**2 * kdfast.kd_loss(ln(zs), ln(zt), temperature=T / kappa)
    torch.testing.assert_close(kdfast.skd_loss(zs, zt, temperature=T, multiplier=kappa), expected, **TIGHT)


def test_v2_high_temperature_is_one_minus_pearson():
    zs, zt, kappa = logits(), logits(), 2.0
    per_row = kdfast.skd_loss(zs, zt, temperature=1000.0, multiplier=kappa, reduction="none")
    pearson = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(zs, zt)])
    torch.testing.assert_close(per_row, kappa**2 * (1 - pearson), rtol=1e-2, atol=1e-4)


def test_v2_positive_affine_image_has_zero_kl():
    zt = logits()
    loss = kdfast.skd_loss(2.5 * zt + 1.0, zt)
    assert abs(loss.item()) < 1e-9


def test_v2_argmax_is_kept():
    z = logits(20, 11)
    for how in ("layernorm", "l2", "standardize"):
        assert torch.equal(normalize_logits(z, how, 2.0, 1e-7).argmax(1), z.argmax(1))


def test_v2_constant_row_is_uniform_finite_and_bounded():
    kappa, eps, T = 2.0, 1e-7, 4.0
    zs = torch.full((1, 8), 3.0, dtype=torch.float64)
    zt = logits(1, 8)
    loss, grad = value_and_grad(kdfast.skd_loss, zs, zt, temperature=T, multiplier=kappa, eps=eps)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.allclose(F.softmax(normalize_logits(zs, "layernorm", kappa, eps), -1), torch.full((1, 8), 1 / 8.0,
                                                                                                   dtype=torch.float64))
    g = T * (F.softmax(torch.zeros(1, 8, dtype=torch.float64), -1)
             - F.softmax(normalize_logits(zt, "layernorm", kappa, eps) / T, -1))
    assert grad.norm() <= kappa / math.sqrt(eps) * g.norm() * (1 + 1e-9)
    for how in ("l2", "standardize"):
        loss, grad = value_and_grad(kdfast.skd_loss, zs, zt, normalize=how)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_v2_parity_with_a_torch_composition():
    zs, zt, y, kappa, T, alpha = logits(), logits(), labels(ignored=()), 2.0, 4.0, 0.7
    hs = kappa * F.layer_norm(zs, zs.shape[-1:], eps=1e-7)
    ht = kappa * F.layer_norm(zt, zt.shape[-1:], eps=1e-7)
    kl = F.kl_div(F.log_softmax(hs / T, -1), F.log_softmax(ht / T, -1), reduction="batchmean", log_target=True)
    expected = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(hs, y)
    torch.testing.assert_close(kdfast.skd_loss(zs, zt, y, alpha=alpha), expected, **TIGHT)


# ---------------------------------------------------------------------------------------------
# V5: Tang et al.
# ---------------------------------------------------------------------------------------------

def test_v5_partial_teacher_is_label_smoothing_with_per_example_epsilon():
    zt, y, lam = logits(), labels(ignored=()), 0.4
    classes = zt.shape[1]
    q_pt = partial_teacher_log_target(zt, y, 1.0).exp()
    rho = F.softmax(zt, -1).gather(1, y[:, None])
    eps = lam * (1 - rho) * classes / (classes - 1)
    onehot = F.one_hot(y, classes).double()
    torch.testing.assert_close((1 - lam) * onehot + lam * q_pt, (1 - eps) * onehot + eps / classes,
                               rtol=0, atol=1e-15)


def test_v5_certain_teacher_gives_ce_and_uniform_teacher_gives_label_smoothing():
    zs, y, lam = logits(), labels(ignored=()), 0.4
    certain = 1000.0 * F.one_hot(y, zs.shape[1]).double()
    torch.testing.assert_close(kdfast.partial_teacher_loss(zs, certain, y, alpha=lam), F.cross_entropy(zs, y), **TIGHT)
    uniform = torch.zeros_like(zs)
    _, grad_pt = value_and_grad(kdfast.partial_teacher_loss, zs, uniform, y, alpha=lam)
    loss_ls, grad_ls = value_and_grad(kdfast.label_smoothing_loss, zs, y, smoothing=lam)
    torch.testing.assert_close(grad_pt, grad_ls, **TIGHT)
    torch.testing.assert_close(kdfast.partial_teacher_loss(zs, uniform, y, alpha=lam),
                               loss_ls - lam * math.log(zs.shape[1]), **TIGHT)


def test_v5_kd_gradient_at_unit_temperature_is_p_minus_soft_target():
    zs, zt, y, lam = logits(), logits(), labels(ignored=()), 0.3
    _, grad = value_and_grad(kdfast.kd_loss, zs, zt, y, temperature=1.0, alpha=lam, reduction="sum")
    target = (1 - lam) * F.one_hot(y, zs.shape[1]).double() + lam * F.softmax(zt, -1)
    torch.testing.assert_close(grad, F.softmax(zs, -1) - target, **TIGHT)


def test_v5_true_logit_gradient_ratio_and_reweighted_ce():
    zs, zt, y, lam = logits(), logits(), labels(ignored=()), 0.6
    _, grad_kd = value_and_grad(kdfast.kd_loss, zs, zt, y, temperature=1.0, alpha=lam, reduction="sum")
    p_y = F.softmax(zs, -1).gather(1, y[:, None]).squeeze(1)
    rho = F.softmax(zt, -1).gather(1, y[:, None]).squeeze(1)
    ratio = grad_kd.gather(1, y[:, None]).squeeze(1) / (p_y - 1)
    torch.testing.assert_close(ratio, 1 - lam * (1 - rho) / (1 - p_y), **TIGHT)
    # re-weighted CE carries exactly this instance weight on the true logit
    _, grad_rw = value_and_grad(kdfast.reweighted_ce_loss, zs, zt, y, alpha=lam, reduction="sum")
    torch.testing.assert_close(grad_rw.gather(1, y[:, None]), grad_kd.gather(1, y[:, None]), **TIGHT)


def test_v5_log_one_minus_rho_is_accurate_near_one():
    rho = 1 - 1e-9
    zt = torch.tensor([[math.log(rho / (1 - rho)), 0.0]], dtype=torch.float64)
    log_q = partial_teacher_log_target(zt, torch.tensor([0]), 1.0)
    assert torch.isfinite(log_q).all()
    assert abs(log_q[0, 1].item() - math.log(1e-9)) < 1e-6


def test_partial_teacher_with_one_class_is_zero_not_nan():
    zs = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    loss = kdfast.partial_teacher_loss(zs, torch.randn(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zs.grad, torch.zeros_like(zs))
