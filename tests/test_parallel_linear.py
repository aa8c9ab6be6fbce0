"""Fused-linear losses across processes (gloo, CPU): vocabulary-parallel LM heads equal the
single-process loss and gradients, with one [N, H] all-reduce per call on top of the row losses'
collectives and none in the backward; DTensor (FSDP2) LM heads train a ``fully_shard``-ed student
exactly like one process.

All cases of one world size run in one spawn of P workers (a module fixture); each worker writes
its measurements to a file, and the parametrised tests below read them.
"""
import copy
import json
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_pool import count_collectives

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROWS, HIDDEN, TEACHER_HIDDEN = 10, 6, 5
SPLITS = {2: [7, 4], 3: [5, 4, 2]}          # uneven vocabulary shards (V = 11)
CHUNK = 4                                   # 10 rows → chunks of 4, 4, 2
GRAD_OUTPUT = 2.5

#: (name, loss, options, collectives of the row loss per chunk)
CASES = [
    ("kd", "fused_linear_kd_loss", dict(temperature=2.0, alpha=0.5), 2),
    ("kd-sum", "fused_linear_kd_loss", dict(reduction="sum"), 2),
    ("kd-mean", "fused_linear_kd_loss", dict(reduction="mean", alpha=0.3), 2),
    ("kd-items", "fused_linear_kd_loss", dict(num_items_in_batch=7), 2),
    ("skd", "fused_linear_skd_loss", dict(alpha=0.5), 3),
    ("skd-l2", "fused_linear_skd_loss", dict(normalize="l2"), 3),
    ("reverse", "fused_linear_divergence_loss", dict(divergence="reverse_kl", student_softcap=3.0), 2),
    ("mixed", "fused_linear_divergence_loss", dict(divergence="mixed_kl", teacher_logit_scale=0.5, alpha=0.8), 2),
    ("jsd", "fused_linear_divergence_loss", dict(divergence="jsd", beta=0.3, temperature=1.5, alpha=0.7), 3),
    ("tvd", "fused_linear_divergence_loss", dict(divergence="tvd"), 3),
    ("skew", "fused_linear_divergence_loss", dict(divergence="skew_reverse_kl", t2_scaling=True, temperature=2.0), 3),
    ("topk", "fused_linear_topk_divergence_loss", dict(tail="renormalize", alpha=0.6), 2),
    ("topk-bucket", "fused_linear_topk_divergence_loss", dict(tail="bucket", divergence="jsd"), 2),
    ("topk-floor", "fused_linear_topk_divergence_loss", dict(tail="renormalize", divergence="reverse_kl",
                                                             reverse_kl_floor=-100.0), 2),
    ("topk-both", "fused_linear_topk_divergence_loss", dict(tail="renormalize_both"), 1),
    ("topk-truncate", "fused_linear_topk_divergence_loss", dict(tail="truncate", student_softcap=4.0), 2),
]


def _problem(vocab, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    data = dict(hidden=torch.randn(ROWS, HIDDEN, generator=gen), teacher_hidden=torch.randn(ROWS, TEACHER_HIDDEN, generator=gen),
                weight=torch.randn(vocab, HIDDEN, generator=gen), teacher_weight=torch.randn(vocab, TEACHER_HIDDEN, generator=gen),
                bias=torch.randn(vocab, generator=gen), teacher_bias=torch.randn(vocab, generator=gen),
                target=torch.randint(0, vocab, (ROWS,), generator=gen))
    data["target"][3] = -100
    data["target"][5] = vocab - 1                           # a label on the last rank's last column
    data["indices"] = torch.stack([torch.randperm(vocab, generator=gen)[:4] for _ in range(ROWS)])
    data["logprobs"] = torch.log_softmax(torch.randn(ROWS, vocab, generator=gen), -1).gather(1, data["indices"])
    data["logprobs"][0, -1] = -float("inf")                 # a padding entry
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}


def _call(kdfast, loss_name, data, weight, bias, teacher_weight, teacher_bias, hidden, options, **extra):
    fn = getattr(kdfast, loss_name)
    if loss_name == "fused_linear_topk_divergence_loss":
        return fn(hidden, weight, data["indices"], data["logprobs"], data["target"], student_bias=bias, **options,
                  **extra)
    return fn(hidden, weight, data["teacher_hidden"], teacher_weight, data["target"], student_bias=bias,
              teacher_bias=teacher_bias, **options, **extra)


def _vocab_parallel_cases(rank, world, kdfast):
    splits = SPLITS[world]
    vocab = sum(splits)
    start, stop = sum(splits[:rank]), sum(splits[:rank + 1])
    results = {}
    for name, loss_name, options, _ in CASES:
        for dtype in (torch.float32, torch.bfloat16) if name == "kd" else (torch.float32,):
            data = _problem(vocab, dtype)
            leaves = {k: data[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
            reference = _call(kdfast, loss_name, data, leaves["weight"], leaves["bias"], data["teacher_weight"],
                              data["teacher_bias"], leaves["hidden"], options, backend="reference")
            (GRAD_OUTPUT * reference).backward()
            local = {"hidden": data["hidden"].clone().requires_grad_(),
                     "weight": data["weight"][start:stop].clone().requires_grad_(),
                     "bias": data["bias"][start:stop].clone().requires_grad_()}
            with count_collectives() as forward:
                loss = _call(kdfast, loss_name, data, local["weight"], local["bias"],
                             data["teacher_weight"][start:stop], data["teacher_bias"][start:stop], local["hidden"],
                             options, vocab_parallel_group=dist.group.WORLD, vocab_start_index=start,
                             chunk_size=CHUNK)
            with count_collectives() as backward:
                (GRAD_OUTPUT * loss).backward()
            results[f"{name}-{str(dtype)[6:]}"] = dict(
                loss=float(loss), reference=float(reference),
                hidden=float((local["hidden"].grad.float() - leaves["hidden"].grad.float()).abs().max()),
                weight=float((local["weight"].grad.float() - leaves["weight"].grad[start:stop].float()).abs().max()),
                bias=float((local["bias"].grad.float() - leaves["bias"].grad[start:stop].float()).abs().max()),
                scale=float(leaves["hidden"].grad.float().abs().max()),
                forward=[name for name, _ in forward], backward=[name for name, _ in backward])
    return results


class TinyLM(torch.nn.Module):
    """Embedding → Linear → tanh (the body) and a separate LM head that the loss reads directly."""

    def __init__(self, vocab=37, hidden=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layer = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def body(self, tokens):
        return torch.tanh(self.layer(self.embed(tokens)))


def _models_and_batch():
    torch.manual_seed(0)
    student, teacher = TinyLM(), TinyLM().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 37, (6, 5), generator=gen)
    labels = torch.randint(0, 37, (6, 5), generator=gen)
    return student, teacher, tokens, labels


def _training_step(kdfast, student, teacher, tokens, labels):
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    loss = kdfast.fused_linear_kd_loss(student.body(tokens), student.lm_head.weight, teacher.body(tokens),
                                       teacher.lm_head.weight, labels, alpha=0.5, temperature=2.0)
    loss.backward()
    optimizer.step()
    return float(loss)


def _fsdp_case(rank, world, kdfast):
    from torch.distributed.fsdp import fully_shard
    student, teacher, tokens, labels = _models_and_batch()
    single = copy.deepcopy(student)
    single_loss = _training_step(kdfast, single, teacher, tokens, labels)
    for model in (student, teacher):
        for module in (model.embed, model.layer, model.lm_head):
            fully_shard(module)
    placements = [p.is_shard(0) for p in student.lm_head.weight.placements]
    per_rank = tokens.shape[0] // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    with count_collectives() as counter:
        loss = _training_step(kdfast, student, teacher, tokens[rows], labels[rows])
    losses = [None] * world
    dist.all_gather_object(losses, loss)
    grad_placements = [p.is_shard(0) for p in student.lm_head.weight.grad.placements]
    errors = {name: float((param.full_tensor() - reference).abs().max())
              for (name, param), reference in zip(student.named_parameters(), single.parameters())}
    changed = float((single.lm_head.weight - _models_and_batch()[0].lm_head.weight).abs().max())
    return dict(placements=placements, grad_placements=grad_placements, mean_loss=sum(losses) / world, single_loss=single_loss, errors=errors,
                head_changed=changed, collectives=[name for name, _ in counter])


def _worker(rank, world, init_file, out_dir):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kdfast
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {"vocab_parallel": _vocab_parallel_cases(rank, world, kdfast)}
        if world == 2:
            results["fsdp"] = _fsdp_case(rank, world, kdfast)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"P{p}")
def spawned(request):
    world = request.param
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, os.path.join(out_dir, "init"), out_dir), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as handle:
                results.append(json.load(handle))
    return world, results


def _tolerance(key):
    return (2e-2, 3e-2) if key.endswith("bfloat16") else (1e-5, 1e-5)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_vocab_parallel_fused_linear_equals_one_process(spawned, case):
    world, results = spawned
    keys = [k for k in results[0]["vocab_parallel"] if k.rsplit("-", 1)[0] == case]
    assert keys
    for key in keys:
        loss_tol, grad_tol = _tolerance(key)
        for rank, result in enumerate(results):
            r = result["vocab_parallel"][key]
            assert r["loss"] == pytest.approx(r["reference"], rel=loss_tol, abs=loss_tol), (key, rank)
            bound = grad_tol * max(1.0, r["scale"])
            assert r["hidden"] <= bound, (key, rank, "grad hidden", r["hidden"])
            assert r["weight"] <= bound, (key, rank, "grad weight shard", r["weight"])
            assert r["bias"] <= bound, (key, rank, "grad bias shard", r["bias"])


@pytest.mark.parametrize("case", [c for c in CASES], ids=[c[0] for c in CASES])
def test_vocab_parallel_fused_linear_collectives(spawned, case):
    """Per call: the row loss's collectives for each chunk, plus one SUM of the [N, H] hidden-state
    gradient; nothing in the backward."""
    name, _, _, per_chunk = case
    chunks = -(-ROWS // CHUNK)
    world, results = spawned
    for result in results:
        r = result["vocab_parallel"][f"{name}-float32"]
        assert r["forward"] == ["all_reduce"] * (per_chunk * chunks + 1), r["forward"]
        assert r["backward"] == []


def test_fsdp2_step_equals_one_process(spawned):
    """A fully_shard-ed student whose LM head is read outside its forward (a DTensor sharded on dim 0)
    takes exactly the single-process SGD step on the whole batch."""
    world, results = spawned
    if world != 2:
        pytest.skip("the FSDP2 step runs with 2 processes")
    for result in results:
        fsdp = result["fsdp"]
        assert fsdp["placements"] == [True]                 # Shard(0) on a 1-D mesh
        assert fsdp["grad_placements"] == [True]
        assert fsdp["head_changed"] > 1e-3                  # the step moved the head: the check has teeth
        assert fsdp["mean_loss"] == pytest.approx(fsdp["single_loss"], rel=1e-6)
        for name, error in fsdp["errors"].items():
            assert error < 1e-6, (name, error)
        # the head: one all-gather per weight (student and teacher) and one reduce-scatter of its gradient
        # run inside DTensor (not through torch.distributed's Python API), so none is counted here
        assert "all_reduce" not in fsdp["collectives"]
