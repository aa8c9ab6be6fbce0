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


# ---------------------------------------------------------------------------------------------
# Hyper-parameters are checked in the constructors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,argument", [
    (lambda: kdfast.KDLoss(temperature=0), "temperature"),
    (lambda: kdfast.KDLoss(reduction="avg"), "reduction"),
    (lambda: kdfast.KDLoss(alpha=1.5), "alpha"),
    (lambda: kdfast.KDLoss(ignore_index=2**70), "ignore_index"),
    (lambda: kdfast.KDLoss(ignore_index="x"), "ignore_index"),
    (lambda: kdfast.KDLoss(backend="gpu"), "backend"),
    (lambda: kdfast.SKDLoss(normalize="l1"), "normalize"),
    (lambda: kdfast.SKDLoss(multiplier=0.0), "multiplier"),
    (lambda: kdfast.SKDLoss(eps=-1.0), "eps"),
    (lambda: kdfast.PartialTeacherLoss(temperature=-2.0), "temperature"),
    (lambda: kdfast.LabelSmoothingLoss(smoothing=1.5), "smoothing"),
    (lambda: kdfast.ReweightedCELoss(eps=0.0), "eps"),
    (lambda: kdfast.NDLoss(torch.randn(3, 4), reduction="batchmean"), "reduction"),
    (lambda: kdfast.NDLoss(torch.randn(3, 4), ignore_index=1.5), "ignore_index"),
    (lambda: kdfast.NystromLoss(3, 4, 4, kind="l1"), "kind"),
    (lambda: kdfast.NystromLoss(3, 4, 4, beta=0.0), "beta"),
    (lambda: kdfast.NystromLoss(3, 4, 4, kind="fro", reduction="mean"), "reduction"),
    (lambda: kdfast.NystromLoss(3, 4, 4, normalize="yes"), "normalize"),
    (lambda: kdfast.L2RKDLoss(kd_weight=-1.0), "kd_weight"),
    (lambda: kdfast.L2RKDLoss(mix_alpha=0.0), "mix_alpha"),
    (lambda: kdfast.FusedLinearKDLoss(reduction="none"), "reduction"),
    (lambda: kdfast.FusedLinearKDLoss(chunk_size=0), "chunk_size"),
    (lambda: kdfast.FusedLinearSKDLoss(normalize="l1"), "normalize"),
    (lambda: kdfast.ClassCenters(3, 4, ignore_index=2**64), "ignore_index"),
])
def test_constructors_reject_bad_hyper_parameters_naming_them(make, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        make()


def test_skd_standardize_default_is_the_logit_standardisation_loss():
    """Logit standardisation's official loss has no multiplier: T²·KL(σ(Z(z^t)/T) ‖ σ(Z(z^s)/T))
    with Z(z) = (z − μ)/(σ + 1e-7), unbiased σ. The default κ of "standardize" reproduces it
    (functional, module and reference alike); κ = 2 would be that loss at T/2."""
    s, t = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    temperature = 3.0

    def standardise(z):
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)

    log_p = torch.log_softmax(standardise(s) / temperature, -1)
    log_q = torch.log_softmax(standardise(t) / temperature, -1)
    expected = temperature**2 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    for got in (kdfast.skd_loss(s, t, temperature=temperature, normalize="standardize"),
                kdfast.SKDLoss(temperature=temperature, normalize="standardize")(s, t),
                kdfast.reference.skd_loss(s, t, temperature=temperature, normalize="standardize")):
        torch.testing.assert_close(got, expected)
    layernorm = kdfast.skd_loss(s, t, temperature=temperature)  # SKD's κ = 2 stays the layernorm default
    torch.testing.assert_close(layernorm, kdfast.skd_loss(s, t, temperature=temperature, multiplier=2.0))


def released_kda_losses(features_s, features_t, labels, epochs, warm, batch):
    """The released KDA training loop's term per step (no CE): class means of the previous epoch
    as landmarks (zeros in epoch 0), Σ smooth-L1(S^s − S^t)/‖S^t‖_F, and nothing before epoch warm."""
    num_classes = int(labels.max()) + 1
    centres_s = torch.zeros(num_classes, features_s.shape[1], dtype=torch.float64)
    centres_t = torch.zeros(num_classes, features_t.shape[1], dtype=torch.float64)
    losses = []
    for epoch in range(epochs):
        sums_s, sums_t = torch.zeros_like(centres_s), torch.zeros_like(centres_t)
        for start in range(0, len(labels), batch):
            fs, ft, y = features_s[start:start + batch], features_t[start:start + batch], labels[start:start + batch]
            sums_s.index_add_(0, y, fs)
            sums_t.index_add_(0, y, ft)
            if epoch < warm:
                losses.append(0.0)
                continue
            ss, st = fs @ centres_s.T, ft @ centres_t.T
            losses.append(float(torch.nn.functional.smooth_l1_loss(ss, st, reduction="sum") / st.norm()))
        counts = torch.bincount(labels, minlength=num_classes).unsqueeze(1).to(torch.float64)
        centres_s, centres_t = sums_s / counts, sums_t / counts
    return losses


@pytest.mark.parametrize("warm", [1, 3])
def test_nystrom_warm_up_equals_the_released_code_as_its_docstring_says(warm):
    """Before the first end_epoch() the loss is zero (the released code with warm = 1); with the
    docstring's recipe (leave the term out while epoch < warm) it equals the released code for any warm."""
    torch.manual_seed(0)
    labels = torch.arange(12) % 3
    features_s, features_t = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    kda = kdfast.NystromLoss(3, 4, 5).double()
    terms = []
    for epoch in range(4):
        for start in range(0, 12, 4):
            term = kda(features_s[start:start + 4], features_t[start:start + 4], labels[start:start + 4])
            if epoch == 0:
                assert term.item() == 0.0
            terms.append(term.item())
        kda.end_epoch()
    as_module = released_kda_losses(features_s, features_t, labels, epochs=4, warm=1, batch=4)
    torch.testing.assert_close(torch.tensor(terms), torch.tensor(as_module))
    gated = [term if step // 3 >= warm else 0.0 for step, term in enumerate(terms)]  # the docstring's recipe
    released = released_kda_losses(features_s, features_t, labels, epochs=4, warm=warm, batch=4)
    torch.testing.assert_close(torch.tensor(gated), torch.tensor(released))
