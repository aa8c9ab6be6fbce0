"""kdfast.interop: torchdistill-style io-dict criteria and an mdistiller-style distiller."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast.interop import CrossEntropyIOLoss, IODictLoss, KDFastDistiller, WeightedSumIOLoss, call_loss


def io(path, tensor, key="output"):
    return {path: {key: tensor}}


@pytest.fixture
def logits():
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    return s, t, y


def test_io_dict_kd_equals_direct_call(logits):
    s, t, y = logits
    loss = kdfast.KDLoss(temperature=2.0, alpha=0.7)
    criterion = IODictLoss(loss, "fc", weight=0.5)
    got = criterion({"fc": {"output": s}, "layer4": {"output": torch.zeros(1)}}, io("fc", t), y)
    torch.testing.assert_close(got, 0.5 * loss(s, t, y))


def test_io_dict_custom_keys_paths_and_no_grad_to_teacher(logits):
    s, _, y = logits
    t = torch.randn(6, 5, requires_grad=True)
    criterion = IODictLoss(kdfast.SKDLoss(), "head.fc", "classifier", student_key="logits", teacher_key="out")
    got = criterion(io("head.fc", s, "logits"), io("classifier", t, "out"), y)
    torch.testing.assert_close(got, kdfast.skd_loss(s, t.detach(), y))
    got.backward()
    assert s.grad is not None and t.grad is None


def test_io_dict_missing_entries_name_what_is_there(logits):
    s, t, y = logits
    criterion = IODictLoss(kdfast.KDLoss(), "fc")
    with pytest.raises(KeyError, match="no module path 'fc'.*'head'"):
        criterion(io("head", s), io("fc", t), y)
    with pytest.raises(KeyError, match="no key 'output'.*'logits'"):
        criterion(io("fc", s, "logits"), io("fc", t), y)


def test_io_dict_features_nd_with_projector_and_flatten():
    torch.manual_seed(0)
    fs, ft = torch.randn(8, 4, 1, 1, requires_grad=True), torch.randn(8, 6, 1, 1)
    y = torch.arange(8) % 3
    nd = kdfast.NDLoss(torch.randn(3, 6), student_dim=4).eval()  # eval: dropout off, so comparable
    criterion = IODictLoss(nd, "avgpool", flatten=True)
    got = criterion(io("avgpool", fs), io("avgpool", ft), y)
    torch.testing.assert_close(got, nd(fs.flatten(1), ft.flatten(1), y))
    assert {id(p) for p in nd.parameters()} == {id(p) for p in criterion.parameters()}


def test_io_dict_label_smoothing_and_l2rkd(logits):
    s, t, y = logits
    ls = IODictLoss(kdfast.LabelSmoothingLoss(0.2), "fc")
    torch.testing.assert_close(ls(io("fc", s), io("fc", t), y), F.cross_entropy(s, y, label_smoothing=0.2))
    ms, mt = torch.randn(6, 5), torch.randn(6, 5)
    l2 = kdfast.L2RKDLoss()
    criterion = IODictLoss(l2, "fc", mixed_student_module="fc_mixed")
    got = criterion({"fc": {"output": s}, "fc_mixed": {"output": ms}}, {"fc": {"output": t}, "fc_mixed": {"output": mt}}, y)
    torch.testing.assert_close(got, l2(s, t, ms, mt, y))
    with pytest.raises(ValueError, match="mixed_student_module"):
        IODictLoss(l2, "fc")


def test_weighted_sum_is_kd_plus_plus(logits):
    s, t, y = logits
    criterion = WeightedSumIOLoss({"ce": CrossEntropyIOLoss("fc"),
                                   "kd": IODictLoss(kdfast.KDLoss(), "fc", weight=2.0)})
    got = criterion(io("fc", s), io("fc", t), y)
    torch.testing.assert_close(got, F.cross_entropy(s, y) + 2.0 * kdfast.kd_loss(s, t))
    assert set(criterion.last_terms) == {"ce", "kd"}


def test_call_loss_rejects_mixed_for_plain_losses(logits):
    s, t, y = logits
    with pytest.raises(ValueError, match="takes no mixed"):
        call_loss(kdfast.KDLoss(), s, t, y, mixed=(s, t))
    with pytest.raises(ValueError, match="mixed inputs"):
        call_loss(kdfast.L2RKDLoss(), s, t, y)


# ------------------------------------------------------------------------------------ mdistiller
class TinyNet(nn.Module):
    """Returns (logits, {"pooled_feat": ..., "feats": [...]}) like mdistiller's models."""

    def __init__(self, width, dropout=0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Dropout(dropout))
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        f = self.body(x)
        return self.fc(f), {"pooled_feat": f, "feats": [f]}


def test_distiller_kd_losses_and_modes():
    torch.manual_seed(0)
    student, teacher = TinyNet(8), TinyNet(16, dropout=0.5)
    distiller = KDFastDistiller(student, teacher, kdfast.KDLoss(temperature=4.0), ce_weight=0.5, loss_weight=2.0)
    distiller.train()
    assert not teacher.training and student.training  # the frozen teacher stays in eval mode
    x, y = torch.randn(12, 10), torch.arange(12) % 4
    logits, losses = distiller(image=x, target=y)
    assert set(losses) == {"loss_ce", "loss_kd"}
    s_logits, t_logits = student(x)[0], teacher(x)[0]
    torch.testing.assert_close(logits, s_logits)
    torch.testing.assert_close(losses["loss_ce"], 0.5 * F.cross_entropy(s_logits, y))
    torch.testing.assert_close(losses["loss_kd"], 2.0 * kdfast.kd_loss(s_logits, t_logits))
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    distiller.eval()
    torch.testing.assert_close(distiller(image=x), s_logits)


def test_distiller_nd_on_features_trains_projector():
    torch.manual_seed(0)
    student, teacher = TinyNet(8), TinyNet(16)
    nd = kdfast.NDLoss(torch.randn(4, 16), student_dim=8)
    distiller = KDFastDistiller(student, teacher, nd, inputs="features", loss_name="loss_nd")
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert {id(p) for p in nd.parameters()} <= learnable and {id(p) for p in student.parameters()} <= learnable
    assert distiller.get_extra_parameters() == sum(p.numel() for p in nd.parameters())
    x, y = torch.randn(12, 10), torch.arange(12) % 4
    distiller.eval()
    nd.eval()  # compare without dropout randomness
    logits, losses = distiller.forward_train(image=x, target=y)
    torch.testing.assert_close(losses["loss_nd"], nd(student(x)[1]["pooled_feat"], teacher(x)[1]["pooled_feat"], y))
    with pytest.raises(KeyError, match="feature_key"):
        KDFastDistiller(student, teacher, nd, inputs="features", feature_key="nope").forward_train(image=x, target=y)


def test_distiller_l2rkd_runs_networks_on_mixed_images_and_warmup():
    torch.manual_seed(0)
    student, teacher = TinyNet(8), TinyNet(16)
    l2 = kdfast.L2RKDLoss(ce_weight=0.0, generator=torch.Generator().manual_seed(5))
    distiller = KDFastDistiller(student, teacher, l2, ce_weight=0.0, warmup_epochs=4)
    x, y = torch.randn(12, 10), torch.arange(12) % 4
    _, losses = distiller.forward_train(image=x, target=y, epoch=1)
    assert set(losses) == {"loss_kd"}
    mixed, _, _ = kdfast.l2rkd_mix(x, generator=torch.Generator().manual_seed(5))
    expected = l2(student(x)[0], teacher(x)[0], student(mixed)[0], teacher(mixed)[0], y)
    torch.testing.assert_close(losses["loss_kd"], 0.25 * expected)  # epoch 1 of a 4-epoch warm-up


def test_distiller_plain_models_and_bad_arguments():
    student, teacher = nn.Linear(10, 4), nn.Linear(10, 4)
    distiller = KDFastDistiller(student, teacher, kdfast.LabelSmoothingLoss(0.1), loss_name="loss_ls")
    x, y = torch.randn(5, 10), torch.arange(5) % 4
    _, losses = distiller.forward_train(x, y)
    torch.testing.assert_close(losses["loss_ls"], F.cross_entropy(student(x), y, label_smoothing=0.1))
    with pytest.raises(ValueError, match="inputs"):
        KDFastDistiller(student, teacher, kdfast.KDLoss(), inputs="both")
    with pytest.raises(ValueError, match="loss_ce"):
        KDFastDistiller(student, teacher, kdfast.KDLoss(), loss_name="loss_ce")
