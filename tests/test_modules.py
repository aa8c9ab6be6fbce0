"""Modules equal their functional twins; stateful modules (NDLoss, NystromLoss) keep the right state;
the dispatcher resolves backends as documented."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import kdfast
from kdfast import _dispatch

B, C = 6, 7


def row_batch():
    y = torch.randint(0, C, (B,))
    y[1] = -100
    return torch.randn(B, C, requires_grad=True), torch.randn(B, C), y


MODULE_CASES = [
    (kdfast.KDLoss(temperature=2.0, alpha=0.4, reduction="sum"),
     lambda s, t, y: kdfast.kd_loss(s, t, y, temperature=2.0, alpha=0.4, reduction="sum"), True),
    (kdfast.SKDLoss(temperature=3.0, multiplier=1.5, alpha=0.8, normalize="standardize"),
     lambda s, t, y: kdfast.skd_loss(s, t, y, temperature=3.0, multiplier=1.5, alpha=0.8, normalize="standardize"),
     True),
    (kdfast.PartialTeacherLoss(temperature=2.0, alpha=0.3, reduction="mean"),
     lambda s, t, y: kdfast.partial_teacher_loss(s, t, y, temperature=2.0, alpha=0.3, reduction="mean"), True),
    (kdfast.LabelSmoothingLoss(smoothing=0.2), lambda s, y: kdfast.label_smoothing_loss(s, y, smoothing=0.2), False),
    (kdfast.ReweightedCELoss(alpha=0.7, reduction="none"),
     lambda s, t, y: kdfast.reweighted_ce_loss(s, t, y, alpha=0.7, reduction="none"), True),
]


@pytest.mark.parametrize("module,functional,takes_teacher", MODULE_CASES, ids=lambda v: type(v).__name__)
def test_row_modules_equal_functional(module, functional, takes_teacher):
    s, t, y = row_batch()
    args = (s, t, y) if takes_teacher else (s, y)
    from_module = module(*args)
    grad_module, = torch.autograd.grad(from_module.sum(), s)
    from_function = functional(*args)
    grad_function, = torch.autograd.grad(from_function.sum(), s)
    torch.testing.assert_close(from_module, from_function, rtol=0, atol=0)
    torch.testing.assert_close(grad_module, grad_function, rtol=0, atol=0)
    assert "reduction" in repr(module)


def test_nd_module_equals_functional_and_projects():
    centres = torch.randn(4, 5)
    u, ft, y = torch.randn(B, 5), torch.randn(B, 5), torch.randint(0, 4, (B,))
    torch.testing.assert_close(kdfast.NDLoss(centres)(u, ft, y), kdfast.nd_loss(u, ft, y, centres))
    projected = kdfast.NDLoss(centres, student_dim=3)
    assert projected.projector is not None
    student = torch.randn(B, 3, requires_grad=True)
    projected(student, ft, y).backward()
    assert student.grad is not None and projected.projector[2].weight.grad is not None
    projected.eval()
    torch.testing.assert_close(projected(student, ft, y), kdfast.nd_loss(projected.projector(student), ft, y, centres))


def test_nd_from_teacher_computes_class_means_and_restores_mode():
    teacher = torch.nn.Linear(3, 5)
    teacher.train()
    inputs, y = torch.randn(40, 3), torch.arange(40) % 4
    loader = DataLoader(TensorDataset(inputs, y), batch_size=7)
    loss = kdfast.NDLoss.from_teacher(teacher, loader, num_classes=4, progress=False, reduction="sum")
    with torch.no_grad():
        feats = teacher(inputs)
    expected = torch.stack([feats[y == k].mean(0) for k in range(4)])
    torch.testing.assert_close(loss.centers, expected, rtol=1e-6, atol=1e-6)
    assert teacher.training and loss.options["reduction"] == "sum"
    custom = kdfast.NDLoss.from_teacher(teacher, loader, num_classes=4, progress=False,
                                        feature_fn=lambda model, x: 2 * model(x))
    torch.testing.assert_close(custom.centers, 2 * expected, rtol=1e-6, atol=1e-6)


def test_nystrom_module_uses_previous_epoch_class_means():
    loss_fn = kdfast.NystromLoss(num_classes=3, student_dim=4, teacher_dim=2)
    fs, ft, y = torch.randn(9, 4), torch.randn(9, 2), torch.arange(9) % 3
    first = loss_fn(fs, ft, y)
    assert first.item() == 0.0  # no landmarks before the first epoch ends
    loss_fn.end_epoch()
    student_means = torch.stack([fs[y == k].mean(0) for k in range(3)])
    teacher_means = torch.stack([ft[y == k].mean(0) for k in range(3)])
    torch.testing.assert_close(loss_fn.student_landmarks, student_means)
    torch.testing.assert_close(loss_fn.teacher_landmarks, teacher_means)
    assert loss_fn.student_centers.counts.sum() == 0  # accumulators restart for the new epoch
    fs2 = torch.randn(9, 4, requires_grad=True)
    torch.testing.assert_close(loss_fn(fs2, ft, y), kdfast.nystrom_loss(fs2, ft, student_means, teacher_means))
    loss_fn.eval()
    loss_fn(fs2, ft, y)
    assert loss_fn.student_centers.counts.sum() == 9  # only the training-mode call accumulated
    state = loss_fn.state_dict()
    assert "student_landmarks" in state and "student_centers.sums" in state


def test_l2rkd_module_equals_functional_and_mixes_reproducibly():
    criterion = kdfast.L2RKDLoss(temperature=2.0, region_weight=0.5, generator=torch.Generator().manual_seed(3))
    images = torch.randn(B, 4)
    mixed, order, lam = criterion.mix(images)
    again = kdfast.l2rkd_mix(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mixed, again[0]) and torch.equal(order, again[1])
    s, t, y = row_batch()
    ms, mt = torch.randn(B, C), torch.randn(B, C)
    torch.testing.assert_close(criterion(s, t, ms, mt, y),
                               kdfast.l2rkd_loss(s, t, ms, mt, y, temperature=2.0, region_weight=0.5))


def test_modules_drop_into_a_training_step():
    student, teacher = torch.nn.Linear(8, C), torch.nn.Linear(8, C)
    optimiser = torch.optim.SGD(student.parameters(), lr=0.5)
    criterion = kdfast.SKDLoss(alpha=0.5)
    x, y = torch.randn(32, 8), torch.randint(0, C, (32,))
    with torch.no_grad():
        teacher_logits = teacher(x)
    losses = []
    for _ in range(30):
        loss = criterion(student(x), teacher_logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def test_reference_is_always_available_and_auto_prefers_fused_backends():
    for loss in kdfast.reference.LOSSES:
        names = kdfast.available_backends(loss, "cpu")
        assert "reference" in names
        chosen = _dispatch.resolve("auto", loss, torch.device("cpu"))
        assert chosen is _dispatch.resolve(names[0], loss, torch.device("cpu"))


def test_unknown_and_unavailable_backends_are_clear_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve("mps-magic", "kd_loss", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable for kd_loss on cpu tensors"):
        _dispatch.resolve("cuda", "kd_loss", torch.device("cpu"))
