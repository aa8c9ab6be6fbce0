"""torch.compile of a training step (model forward + kdfast loss, then backward) through the public
API: zero graph breaks with the backend "auto" picks on CPU, and the same loss and gradients as
eager. AOT autograd ("aot_eager") traces forward and backward through the ops' fake
implementations without paying for code generation."""
import pytest
import torch

import kdfast

B, D, C = 8, 6, 5


def public_losses(num_classes, centres, landmarks_s, landmarks_t):
    """name → loss(z, t, y) for every public loss, as a training step calls them (the subprocess of
    the first-call test imports this too)."""
    eye = torch.eye(num_classes)
    return {
        "kd_loss": lambda z, t, y: kdfast.kd_loss(z, t, y, alpha=0.5),
        "skd_loss": lambda z, t, y: kdfast.skd_loss(z, t, y, alpha=0.5),
        "partial_teacher_loss": lambda z, t, y: kdfast.partial_teacher_loss(z, t, y),
        "label_smoothing_loss": lambda z, t, y: kdfast.label_smoothing_loss(z, y),
        "reweighted_ce_loss": lambda z, t, y: kdfast.reweighted_ce_loss(z, t, y),
        "nd_loss": lambda z, t, y: kdfast.nd_loss(z, t, y % 3, centres),
        "nystrom_loss": lambda z, t, y: kdfast.nystrom_loss(z, t, landmarks_s, landmarks_t),
        "l2rkd_loss": lambda z, t, y: kdfast.l2rkd_loss(z, t, 0.5 * z, 0.5 * t, y),
        "fused_linear_kd_loss": lambda z, t, y: kdfast.fused_linear_kd_loss(z, eye, t, eye, y, alpha=0.5,
                                                                            chunk_size=3),
        "fused_linear_skd_loss": lambda z, t, y: kdfast.fused_linear_skd_loss(z, eye, t, eye, y, alpha=0.5,
                                                                              chunk_size=3),
    }


def make_step(name):
    """(model, step(x, teacher_logits or features, y) -> loss) for each public loss."""
    torch.manual_seed(0)
    model = torch.nn.Linear(D, C)
    loss = public_losses(C, torch.randn(3, C), torch.randn(4, C), torch.randn(4, C))[name]
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


FIRST_CALL_SCRIPT = r'''
import json, sys
import torch
import kdfast

sys.path.insert(0, "tests")
from test_compile import B, C, D, public_losses  # the losses as the in-process tests call them

torch.manual_seed(0)
model = torch.nn.Linear(D, C)
losses = public_losses(C, torch.randn(3, C), torch.randn(4, C), torch.randn(4, C))
steps = {name: (lambda x, t, y, loss=loss: loss(model(x), t, y)) for name, loss in losses.items()}
torch._dynamo.config.recompile_limit = 64  # the steps share one code object
x, t, y = torch.randn(B, D), torch.randn(B, C), torch.randint(0, C, (B,))
result = {"breaks": {}, "mismatches": {}}
for name, step in steps.items():  # every loss traced before any eager kdfast call of this process
    explanation = torch._dynamo.explain(step)(x, t, y)
    result["breaks"][name] = [str(reason.reason)[:300] for reason in explanation.break_reasons]
torch._dynamo.reset()
compiled = {name: torch.compile(step, backend="aot_eager", fullgraph=True)(x, t, y) for name, step in steps.items()}
for name, step in steps.items():
    eager = step(x, t, y)
    grads = torch.autograd.grad(compiled[name], list(model.parameters()))
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    try:
        torch.testing.assert_close(compiled[name], eager)
        for got, expected in zip(grads, eager_grads):
            torch.testing.assert_close(got, expected)
    except AssertionError as error:
        result["mismatches"][name] = str(error)[:300]
print("RESULT" + json.dumps(result))
'''


def test_every_public_loss_compiles_with_fullgraph_as_the_first_call_of_a_process():
    """A fresh interpreter whose first kdfast calls are traced: no import, registration or lookup
    that dynamo cannot trace (none happens inside the step), so zero graph breaks, and
    fullgraph=True compiles and matches eager."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    environment.pop("TRITON_INTERPRET", None)
    completed = subprocess.run([sys.executable, "-c", FIRST_CALL_SCRIPT], capture_output=True, text=True,
                               cwd=root, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.split("RESULT", 1)[1])
    assert len(result["breaks"]) == 10
    assert {name: reasons for name, reasons in result["breaks"].items() if reasons} == {}
    assert result["mismatches"] == {}
