"""torch.compile of a training step (model forward + kdfast loss, then backward) through the public
API: zero graph breaks with the backend "auto" picks on CPU, and the same loss and gradients as
eager. AOT autograd ("aot_eager") traces forward and backward through the ops' fake
implementations without paying for code generation."""
import pytest
import torch

import kdfast

B, D, C = 8, 6, 5


def make_step(name):
    """(model, step(x, teacher_logits or features, y) -> loss) for each public loss."""
    torch.manual_seed(0)
    model = torch.nn.Linear(D, C)
    centres, landmarks_s, landmarks_t = torch.randn(3, C), torch.randn(4, C), torch.randn(4, C)
    losses = {
        "kd_loss": lambda z, t, y: kdfast.kd_loss(z, t, y, alpha=0.5),
        "skd_loss": lambda z, t, y: kdfast.skd_loss(z, t, y, alpha=0.5),
        "partial_teacher_loss": lambda z, t, y: kdfast.partial_teacher_loss(z, t, y),
        "label_smoothing_loss": lambda z, t, y: kdfast.label_smoothing_loss(z, y),
        "reweighted_ce_loss": lambda z, t, y: kdfast.reweighted_ce_loss(z, t, y),
        "nd_loss": lambda z, t, y: kdfast.nd_loss(z, t, y % 3, centres),
        "nystrom_loss": lambda z, t, y: kdfast.nystrom_loss(z, t, landmarks_s, landmarks_t),
        "l2rkd_loss": lambda z, t, y: kdfast.l2rkd_loss(z, t, 0.5 * z, 0.5 * t, y),
        "fused_linear_skd_loss": lambda z, t, y: kdfast.fused_linear_skd_loss(z, torch.eye(C), t, torch.eye(C), y,
                                                                              alpha=0.5, chunk_size=3),
    }
    loss = losses[name]
    return model, lambda x, t, y: loss(model(x), t, y)


NAMES = ["kd_loss", "skd_loss", "partial_teacher_loss", "label_smoothing_loss", "reweighted_ce_loss", "nd_loss",
         "nystrom_loss", "l2rkd_loss", "fused_linear_skd_loss"]


@pytest.mark.parametrize("name", NAMES)
def test_training_step_has_no_graph_break_and_matches_eager(name):
    model, step = make_step(name)
    x, t, y = torch.randn(B, D), torch.randn(B, C), torch.randint(0, C, (B,))
    step(x, t, y)  # eager first: loads the backend module outside the traced region
    explanation = torch._dynamo.explain(step)(x, t, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    eager = step(x, t, y)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x, t, y)
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected)
