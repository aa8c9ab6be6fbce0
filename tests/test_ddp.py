"""Two gloo processes on CPU give the same centres, landmarks and training step as one process.

The workers are started with torch.multiprocessing.spawn and meet through a file:// init method
in a temporary directory (no TCP port). The DDP wrapper under test is the digits example's
``DistillStep`` (student + ND loss in one module).
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from distill_digits import MLP, NUM_CLASSES  # noqa: E402
from distill_digits_ddp import DistillStep  # noqa: E402

import kdfast  # noqa: E402

WORLD = 2
ATOL = 1e-6
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def make_problem():
    """Deterministic data and networks shared by the workers and the single-process run. Feature
    sizes match (12 = 12), so ND needs no projector (its BatchNorm would be per-rank)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=gen)
    y = torch.arange(40) % NUM_CLASSES
    y = y[torch.randperm(40, generator=gen)]
    torch.manual_seed(1)
    teacher = MLP([12]).eval().requires_grad_(False)
    torch.manual_seed(2)
    student = MLP([12])
    return x, y, teacher, student


def kda_step(teacher):
    torch.manual_seed(3)  # the same student initialisation in every process
    return DistillStep(MLP([12]), teacher, "kda")


def local(tensor, rank, world):
    """This rank's rows: rank, rank + world, ... (as the example's global_batches)."""
    return tensor[rank::world]


def centres(teacher, x, y, rank=0, world=1):
    loader = [(local(x, rank, world)[i:i + 8], local(y, rank, world)[i:i + 8]) for i in range(0, 40 // world, 8)]
    return kdfast.NDLoss.from_teacher(teacher, loader, NUM_CLASSES, progress=False,
                                      feature_fn=lambda m, inp: m.features(inp))


def landmarks(module, x, y, rank=0, world=1):
    """One 'epoch' of two global batches of 20 rows through NystromLoss, then end_epoch(). Forward
    and backward with grad enabled, as in training (DDP syncs buffers only then); no optimiser
    step, so the features, and hence the landmarks, do not depend on the gradients."""
    step = module.module if isinstance(module, DDP) else module
    for start in (0, 20):
        module(local(x[start:start + 20], rank, world), local(y[start:start + 20], rank, world)).backward()
    step.kda.end_epoch()
    return step.kda.student_landmarks.clone(), step.kda.teacher_landmarks.clone()


def one_step(module, params, x, y):
    opt = torch.optim.SGD(params, lr=0.5)
    loss = module(x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def _worker(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        x, y, teacher, student = make_problem()
        out = {}
        nd = centres(teacher, x, y, rank, world)
        out["centres"] = nd.centers.clone()

        kda = DDP(kda_step(teacher), broadcast_buffers=False)
        out["landmarks"] = landmarks(kda, x, y, rank, world)
        # DDP's default per-forward buffer sync must not touch the running sums (they are not buffers).
        synced = DDP(kda_step(teacher))
        out["landmarks_synced"] = landmarks(synced, x, y, rank, world)

        step = DistillStep(student, teacher, "kd_nd", nd)
        ddp = DDP(step)
        batch_x, batch_y = x[:20], y[:20]
        loss = one_step(ddp, ddp.parameters(), local(batch_x, rank, world), local(batch_y, rank, world))
        dist.all_reduce(loss)
        out["loss"] = loss / world
        out["params"] = {k: v.detach().clone() for k, v in step.student.state_dict().items()}
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(WORLD, tmp), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


def test_teacher_centres_all_reduced(ranks):
    x, y, teacher, _ = make_problem()
    expected = centres(teacher, x, y).centers
    for out in ranks:
        torch.testing.assert_close(out["centres"], expected, atol=ATOL, rtol=0)


def test_nystrom_landmarks_all_reduced(ranks):
    x, y, teacher, _ = make_problem()
    expected_s, expected_t = landmarks(kda_step(teacher), x, y)
    for out in ranks:
        torch.testing.assert_close(out["landmarks"][1], expected_t, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["landmarks"][0], expected_s, atol=ATOL, rtol=0)
    # the same with DDP's default buffer sync: the running sums are kept out of the synced buffers
    for out in ranks:
        torch.testing.assert_close(out["landmarks_synced"][1], expected_t, atol=ATOL, rtol=0)
        torch.testing.assert_close(out["landmarks_synced"][0], expected_s, atol=ATOL, rtol=0)


def test_one_ddp_step_equals_single_process(ranks):
    x, y, teacher, student = make_problem()
    nd = centres(teacher, x, y)
    step = DistillStep(student, teacher, "kd_nd", nd)
    loss = one_step(step, step.parameters(), x[:20], y[:20])
    before = make_problem()[3].state_dict()
    for out in ranks:
        torch.testing.assert_close(out["loss"], loss, atol=ATOL, rtol=0)
        for name, value in step.student.state_dict().items():
            torch.testing.assert_close(out["params"][name], value, atol=ATOL, rtol=0)
            assert not torch.equal(value, before[name]), f"{name} was not updated: the step tested nothing"
