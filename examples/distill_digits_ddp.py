"""The digits distillation under DistributedDataParallel on CPU (gloo), with all-reduced centres.

    python -m torch.distributed.run --nproc_per_node 2 examples/distill_digits_ddp.py
    python -m torch.distributed.run --nproc_per_node 2 examples/distill_digits_ddp.py --methods kd_nd --epochs 20

Same data, networks and hyper-parameters as ``distill_digits.py`` (see its docstring). Every global
batch is drawn from one permutation that all ranks share (same generator seed) and split between
ranks, so the run sees the same global batches as a single process would; the losses are means
over rows, so DDP's gradient averaging gives the gradient of the global-batch loss.

Methods (all with CE; weights as in KD++): ``ce``; ``kd`` = CE + 1.0*KD(T=4); ``kd_nd`` = CE +
1.0*KD + 2.0*ND (the digits script's "nd"); ``kda`` = CE + 1.0*NystromLoss. The global batch is 32
(16 per rank), as the single-process student's batch.

What is distributed:
- the teacher is trained with DDP;
- ND's teacher class centres (``NDLoss.from_teacher``) are computed on each rank's shard of the
  training set and all-reduced by :class:`kdfast.ClassCenters`: every rank gets the centres of
  the whole set (checked below against an all-gather);
- KDA's per-epoch landmarks (``NystromLoss.end_epoch``) are all-reduced the same way.

Two DDP details worth knowing:
- DDP's default per-forward buffer sync is harmless: ``ClassCenters`` keeps its running sums
  out of the module buffers DDP copies from rank 0, so each rank accumulates its own shard.
- The ND projector's BatchNorm keeps per-rank statistics: SyncBatchNorm has no CPU support.
  KDA's smooth-L1 / ||S^t||_F normalisation is per local batch, so a 2-rank KDA step is close to,
  but not the same as, a single-process step on the global batch (KD, ND and CE are exact).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_digits import HERE, MLP, NUM_CLASSES, accuracy, load_split  # noqa: E402

import kdfast  # noqa: E402

DDP_METHODS = ("ce", "kd", "kd_nd", "kda")

class DistillStep(nn.Module):
    """The student plus every trainable part of its loss in one module, ``forward(x, y) -> loss``.

    DDP synchronises the gradients of the parameters of the module it wraps, so the ND projector
    must live inside it; the teacher is kept outside (frozen, never synchronised)."""

    def __init__(self, student: MLP, teacher: MLP | None, method: str, nd: kdfast.NDLoss | None = None,
                 nd_weight: float = 2.0, kd_weight: float = 1.0, temperature: float = 4.0):
        super().__init__()
        self.student, self.method = student, method
        self._teacher = (teacher,)  # a tuple, so the teacher is not registered as a submodule
        self.kd = kdfast.KDLoss(temperature=temperature)
        self.nd, self.nd_weight, self.kd_weight = nd, nd_weight, kd_weight
        self.kda = kdfast.NystromLoss(NUM_CLASSES, student.feature_dim, teacher.feature_dim) \
            if method == "kda" else None

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, x, y):
        logits, feats = self.student(x, return_features=True)
        loss = nn.functional.cross_entropy(logits, y)
        if self.method == "ce":
            return loss
        with torch.no_grad():
            t_logits, t_feats = self.teacher(x, return_features=True)
        if self.method in ("kd", "kd_nd"):
            loss = loss + self.kd_weight * self.kd(logits, t_logits)
        if self.method == "kd_nd":
            loss = loss + self.nd_weight * self.nd(feats, t_feats, y)
        if self.method == "kda":
            loss = loss + self.kda(feats, t_feats, y)
        return loss


class CEStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.model(x), y)


def global_batches(n: int, global_batch: int, generator: torch.Generator, rank: int, world: int):
    """This rank's share of each global batch: every rank draws the same permutation and keeps
    rows rank, rank + world, ... of each global batch."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + global_batch][rank::world] for i in range(0, n, global_batch)]


def train(ddp_model: DDP, x, y, epochs: int, global_batch: int, lr: float, seed: int, rank: int, world: int,
          on_epoch_end=None, weight_decay: float = 0.0):
    opt = torch.optim.Adam(ddp_model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        ddp_model.train()
        for idx in global_batches(len(y), global_batch, gen, rank, world):
            loss = ddp_model(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch_end is not None:
            on_epoch_end()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(DDP_METHODS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--student-samples", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()

    x_tr, y_tr, x_te, y_te, sub = load_split(args.student_samples or None)
    torch.manual_seed(0)  # DDP also broadcasts rank 0's initial parameters
    teacher = MLP([256, 256], dropout=0.2)
    train(DDP(CEStep(teacher)), x_tr, y_tr, args.teacher_epochs, 64, 1e-3, 0, rank, world, weight_decay=1e-4)
    teacher.eval().requires_grad_(False)
    t_acc = accuracy(teacher, x_te, y_te)

    xs, ys = x_tr[sub], y_tr[sub]
    shard = torch.arange(len(ys))[rank::world]  # this rank's rows for the class centres
    loader = [(xs[shard][i:i + 64], ys[shard][i:i + 64]) for i in range(0, len(shard), 64)]
    results = []
    for method in args.methods.split(","):
        accs = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            student = MLP([16])
            nd = None
            if method == "kd_nd":
                nd = kdfast.NDLoss.from_teacher(teacher, loader, NUM_CLASSES, progress=False,
                                                feature_fn=lambda m, inp: m.features(inp),
                                                student_dim=student.feature_dim)
                gathered = [torch.empty_like(nd.centers) for _ in range(world)]
                dist.all_gather(gathered, nd.centers)
                assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks disagree on the centres"
            step = DistillStep(student, teacher, method, nd)
            ddp = DDP(step)
            train(ddp, xs, ys, args.epochs, 32, 3e-3, seed, rank, world,
                  on_epoch_end=step.kda.end_epoch if step.kda is not None else None)
            accs.append(accuracy(student, x_te, y_te))
        results.append((method, accs))
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"{world} ranks (gloo); teacher test accuracy {100 * t_acc:.2f}%")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "digits_ddp.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["method", "mean_acc", "std_acc", "n_seeds", "world_size"])
            w.writerow(["teacher", f"{t_acc:.4f}", "", 1, world])
            for method, accs in results:
                a = torch.tensor(accs)
                std = a.std().item() if len(a) > 1 else 0.0
                print(f"{method:<8} {100 * a.mean():6.2f} ± {100 * std:4.2f}  ({len(a)} seeds)")
                w.writerow([method, f"{a.mean():.4f}", f"{std:.4f}", len(a), world])
        print(f"wall time {elapsed:.0f} s; saved {os.path.join(args.out, 'digits_ddp.csv')}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
