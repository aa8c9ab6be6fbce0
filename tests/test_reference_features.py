"""The reference of the feature–centre (ND) and landmark-Gram (KDA / Nyström) families, and L2RKD:
parity with the independent implementation, gradcheck, spec §8 V3, V4, V6."""
import pytest
import torch

import kdfast
from kdfast.reference import nystrom_reconstruction

import naive

TIGHT = dict(rtol=1e-10, atol=1e-10)


def features(rows=6, dim=5, scale=1.0):
    return scale * torch.randn(rows, dim, dtype=torch.float64)


def value_and_grad(loss_fn, student, *args, **kwargs):
    student = student.clone().requires_grad_()
    loss = loss_fn(student, *args, **kwargs)
    loss.sum().backward()
    return loss.detach(), student.grad


def assert_matches_naive(ours, theirs):
    torch.testing.assert_close(ours[0], torch.as_tensor(theirs[0], dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(ours[1], torch.as_tensor(theirs[1], dtype=torch.float64), **TIGHT)


def nd_batch(rows=8, dim=5, classes=4):
    """Half the rows have ‖u‖ > ‖f^t‖ (cosine branch), half ‖u‖ < ‖f^t‖ (linear branch)."""
    u = features(rows, dim)
    teacher = features(rows, dim)
    teacher = teacher / teacher.norm(dim=1, keepdim=True) * u.norm(dim=1, keepdim=True)
    teacher[::2] *= 0.5
    teacher[1::2] *= 2.0
    return u, teacher, torch.randint(0, classes, (rows,)), features(classes, dim, scale=3.0)


# ---------------------------------------------------------------------------------------------
# ND
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nd_matches_naive(reduction):
    u, ft, y, centres = nd_batch()
    y[3] = -100
    ours = value_and_grad(kdfast.nd_loss, u, ft, y, centres, reduction=reduction)
    assert_matches_naive(ours, naive.nd(u.numpy(), ft.numpy(), y.numpy(), centres.numpy(), reduction=reduction))


def test_nd_tie_takes_the_cosine_branch():
    u, _, y, centres = nd_batch(rows=3)
    ft = u.clone()  # ‖u‖ = ‖f^t‖ exactly
    ours = value_and_grad(kdfast.nd_loss, u, ft, y, centres, reduction="none")
    assert_matches_naive(ours, naive.nd(u.numpy(), ft.numpy(), y.numpy(), centres.numpy(), reduction="none"))
    # on the cosine branch the gradient is orthogonal to u
    assert (ours[1] * u).sum(1).abs().max() < 1e-12


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nd_gradcheck(reduction):
    u, ft, y, centres = nd_batch()
    assert torch.autograd.gradcheck(lambda s: kdfast.nd_loss(s, ft, y, centres, reduction=reduction),
                                    (u.requires_grad_(),))


def test_v3_1_cosine_branch():
    u, ft, y, centres = nd_batch()
    cosine = slice(0, None, 2)  # ‖u‖ > ‖f^t‖ on even rows
    per_row, grad = value_and_grad(kdfast.nd_loss, u, ft, y, centres, reduction="none")
    cos = torch.nn.functional.cosine_similarity(u, centres[y], dim=1)
    torch.testing.assert_close(per_row[cosine], (1 - cos)[cosine], **TIGHT)
    torch.testing.assert_close(kdfast.nd_loss(1.7 * u, ft, y, centres, reduction="none")[cosine], per_row[cosine],
                               **TIGHT)
    assert (grad[cosine] * u[cosine]).sum(1).abs().max() < 1e-12


def test_v3_2_linear_branch_gradient_is_constant():
    u, ft, y, centres = nd_batch()
    linear = slice(1, None, 2)  # ‖u‖ < ‖f^t‖ on odd rows
    _, grad = value_and_grad(kdfast.nd_loss, u, ft, y, centres)
    unit = centres[y] / centres[y].norm(dim=1, keepdim=True)
    expected = -unit / (u.shape[0] * ft.norm(dim=1, keepdim=True))
    torch.testing.assert_close(grad[linear], expected[linear], **TIGHT)
    _, grad_moved = value_and_grad(kdfast.nd_loss, 0.9 * u, ft, y, centres)
    torch.testing.assert_close(grad_moved[linear], grad[linear], **TIGHT)


def test_v3_3_non_negative_and_zero_on_the_centre_ray():
    u, ft, y, centres = nd_batch(rows=32)
    assert (kdfast.nd_loss(u, ft, y, centres, reduction="none") >= -1e-12).all()
    unit = centres[y] / centres[y].norm(dim=1, keepdim=True)
    on_ray = unit * (ft.norm(dim=1, keepdim=True) * 1.5)
    assert kdfast.nd_loss(on_ray, ft, y, centres, reduction="none").abs().max() < 1e-12
    short = unit * (ft.norm(dim=1, keepdim=True) * 0.5)
    assert (kdfast.nd_loss(short, ft, y, centres, reduction="none") > 0.1).all()


def test_v3_4_centre_scale_invariance():
    u, ft, y, centres = nd_batch()
    scales = torch.rand(centres.shape[0], 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(kdfast.nd_loss(u, ft, y, centres * scales), kdfast.nd_loss(u, ft, y, centres), **TIGHT)


def test_v3_6_permutation():
    u, ft, y, centres = nd_batch()
    order = torch.randperm(u.shape[0])
    per_row = kdfast.nd_loss(u, ft, y, centres, reduction="none")
    torch.testing.assert_close(kdfast.nd_loss(u[order], ft[order], y[order], centres, reduction="none"),
                               per_row[order], **TIGHT)
    torch.testing.assert_close(kdfast.nd_loss(u[order], ft[order], y[order], centres), per_row.mean(), **TIGHT)


def test_nd_no_gradient_to_teacher_or_centres():
    u, ft, y, centres = nd_batch()
    ft.requires_grad_()
    centres.requires_grad_()
    kdfast.nd_loss(u.requires_grad_(), ft, y, centres).backward()
    assert ft.grad is None and centres.grad is None and u.grad is not None


# ---------------------------------------------------------------------------------------------
# KDA / Nyström
# ---------------------------------------------------------------------------------------------

def gram_batch(rows=6, ds=5, dt=3, m=4, scale=1.0):
    return features(rows, ds, scale), features(rows, dt, scale), features(m, ds), features(m, dt)


CASES = [("smooth_l1", r) for r in ("none", "sum", "mean")] + [("sq_fro", r) for r in ("none", "sum", "mean")] \
    + [("fro", "sum")]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kind,reduction", CASES)
def test_nystrom_matches_naive(kind, reduction, normalize):
    fs, ft, cs, ct = gram_batch(scale=0.7)  # residuals on both sides of the Huber switch
    ours = value_and_grad(kdfast.nystrom_loss, fs, ft, cs, ct, kind=kind, reduction=reduction, normalize=normalize)
    theirs = naive.nystrom(fs.numpy(), ft.numpy(), cs.numpy(), ct.numpy(), kind=kind, reduction=reduction,
                           normalize=normalize)
    assert_matches_naive(ours, theirs)


@pytest.mark.parametrize("kind,reduction", CASES)
def test_nystrom_gradcheck(kind, reduction):
    fs, ft, cs, ct = gram_batch(scale=0.7)
    assert torch.autograd.gradcheck(lambda s: kdfast.nystrom_loss(s, ft, cs, ct, kind=kind, reduction=reduction),
                                    (fs.requires_grad_(),))


def test_v4_1_landmarks_equal_to_the_batch():
    fs, ft = features(6, 5), features(6, 3)
    full = fs @ fs.T
    torch.testing.assert_close(nystrom_reconstruction(fs, fs), full, rtol=1e-12, atol=1e-12)
    residual = fs @ fs.T - ft @ ft.T
    huber = torch.where(residual.abs() < 1, 0.5 * residual**2, residual.abs() - 0.5).sum()
    torch.testing.assert_close(kdfast.nystrom_loss(fs, ft, fs, ft), huber / (ft @ ft.T).norm(), **TIGHT)


def test_v4_1_reconstruction_is_exact_when_features_lie_in_the_landmark_span():
    landmarks = features(4, 6)
    fs = torch.randn(10, 4, dtype=torch.float64) @ landmarks
    torch.testing.assert_close(nystrom_reconstruction(fs, landmarks), fs @ fs.T, rtol=1e-9, atol=1e-9)


def test_v4_2_zero_when_student_equals_teacher():
    fs, _, cs, _ = gram_batch()
    loss, grad = value_and_grad(kdfast.nystrom_loss, fs, fs.clone(), cs, cs.clone())
    assert loss.item() == 0.0 and grad.abs().max() == 0.0
    loss, grad = value_and_grad(kdfast.nystrom_loss, fs, fs.clone(), cs, cs.clone(), kind="fro")
    assert loss.item() < 1e-100 and torch.isfinite(grad).all()


def test_v4_3_joint_rotation_invariance():
    fs, ft, cs, ct = gram_batch()
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    torch.testing.assert_close(kdfast.nystrom_loss(fs @ q, ft, cs @ q, ct), kdfast.nystrom_loss(fs, ft, cs, ct),
                               **TIGHT)


def test_v4_4_landmark_permutation_invariance():
    fs, ft, cs, ct = gram_batch()
    order = torch.randperm(cs.shape[0])
    torch.testing.assert_close(kdfast.nystrom_loss(fs, ft, cs[order], ct[order]),
                               kdfast.nystrom_loss(fs, ft, cs, ct), **TIGHT)


def test_v4_5_gradient_is_clipped_residual_times_landmarks():
    fs, ft, cs, ct = gram_batch(scale=2.0)
    _, grad = value_and_grad(kdfast.nystrom_loss, fs, ft, cs, ct)
    residual = fs @ cs.T - ft @ ct.T
    assert (residual.abs() > 1).any() and (residual.abs() < 1).any()  # both Huber branches exercised
    expected = residual.clamp(-1, 1) @ cs / (ft @ ct.T).norm()
    torch.testing.assert_close(grad, expected, **TIGHT)


def test_nystrom_no_gradient_to_landmarks_or_teacher():
    fs, ft, cs, ct = (t.requires_grad_() for t in gram_batch())
    kdfast.nystrom_loss(fs, ft, cs, ct).backward()
    assert fs.grad is not None and ft.grad is None and cs.grad is None and ct.grad is None


# ---------------------------------------------------------------------------------------------
# L2RKD (V6)
# ---------------------------------------------------------------------------------------------

def test_v6_1_no_mixing_is_kd_with_summed_weights():
    zs, zt = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (6,))
    images = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    mixed, _, lam = kdfast.l2rkd_mix(images, lam_min=1.0)
    assert torch.equal(lam, torch.ones(6, dtype=torch.float64)) and torch.equal(mixed, images)
    loss = kdfast.l2rkd_loss(zs, zt, zs, zt, y, kd_weight=0.7, region_weight=0.4)
    expected = torch.nn.functional.cross_entropy(zs, y) + 1.1 * kdfast.kd_loss(zs, zt)
    torch.testing.assert_close(loss, expected, **TIGHT)


def test_v6_2_mixing_is_linear_and_reproducible():
    images = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    first = kdfast.l2rkd_mix(images, alpha=0.4, generator=torch.Generator().manual_seed(7))
    again = kdfast.l2rkd_mix(images, alpha=0.4, generator=torch.Generator().manual_seed(7))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    mixed, order, lam = first
    assert sorted(order.tolist()) == list(range(8)) and ((lam >= 0) & (lam <= 1)).all()
    weight = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(mixed, weight * images + (1 - weight) * images[order], **TIGHT)
    ranged = kdfast.l2rkd_mix(images, lam_min=0.8, generator=torch.Generator().manual_seed(1))[2]
    assert ((ranged >= 0.8) & (ranged <= 1)).all()


def test_v6_3_zero_when_student_network_equals_teacher_network():
    net = torch.nn.Linear(12, 5).double()
    images = torch.randn(6, 12, dtype=torch.float64)
    mixed, _, _ = kdfast.l2rkd_mix(images, generator=torch.Generator().manual_seed(0))
    loss = kdfast.l2rkd_loss(net(images), net(images), net(mixed), net(mixed), ce_weight=0.0)
    assert abs(loss.item()) < 1e-12


def test_l2rkd_gradcheck():
    zs, zt = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    ms, mt = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    assert torch.autograd.gradcheck(lambda a, b: kdfast.l2rkd_loss(a, zt, b, mt, y),
                                    (zs.requires_grad_(), ms.requires_grad_()))
