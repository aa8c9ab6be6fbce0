"""Tensor-parallel (vocabulary-parallel) distillation of the byte-level LM of ``distill_lm.py``.

    python -m torch.distributed.run --nproc_per_node 2 --standalone examples/distill_lm_tp.py
    python -m torch.distributed.run --nproc_per_node 2 --standalone examples/distill_lm_tp.py --split 150,106
    python -m torch.distributed.run --nproc_per_node 2 --standalone examples/distill_lm_tp.py --quick

(gloo on CPU; run without ``torch.distributed.run`` it is a 1-rank group.) Text, networks, seeds,
batches and hyper-parameters are those of ``distill_lm.py`` (imported from it): 400 KB of the
standard library's ``*.py``, a 512-512-256 byte-MLP teacher trained with CE for 800 steps, a 128-64
student distilled for 800 steps with ``fused_linear_kd_loss`` (T=2, alpha=0.5), Adam 2e-3, batches of
1024 positions, gradient clipping at 1.0.

What is parallel: the vocabulary. Rank r holds rows [start_r, stop_r) of the student's and the
teacher's LM heads (Megatron's ColumnParallelLinear layout; ``VocabParallelHead``: the rows as the
``nn.Parameter`` s of a small module); the embedding and MLP bodies are replicated (same seed, same
batches on every rank). The loss is

    kdfast.fused_linear_kd_loss(h_s, head_s.weight, h_t, head_t.weight, y, ...,
                                vocab_parallel_group=group, vocab_start_index=start_r)

which never forms more than a chunk of this rank's [tokens, V_r] logits and exchanges only per-row
statistics, plus one SUM of the [tokens, H] hidden-state gradient. That gradient comes back already
summed over the group, so the bodies' gradients are identical on every rank without any further
communication; the script checks it (all-gathered and compared) at the start and at every log line,
and checks at the end that the bodies' parameters are still identical.

Other communication this script adds, as a real tensor-parallel trainer must:
- gradient clipping on the global norm: the head shards' squared norms are summed over the group
  (one scalar all-reduce per step), the bodies' counted once;
- validation perplexity with the vocabulary split: a vocabulary-parallel cross-entropy (MAX of the
  row maxima, then one SUM of the stacked (sum-exp, label logit) per row), cross-checked on rank 0
  against ``distill_lm.perplexity`` of the student reassembled from the gathered shards.

Checks printed by rank 0:
- at the start, for one batch, the tensor-parallel loss and gradients against the single-process
  ``kdfast.fused_linear_kd_loss`` on the full heads (line ``TP check ... PASSED``);
- at the end (``--reference``, on by default), a single-process student trained by rank 0 with the
  same initialisation, batches and loss on the full heads: its perplexity and the largest parameter
  difference from the tensor-parallel student.

``--split 150,106`` gives each rank an explicit, uneven block of the 256 bytes (vocab_start_index
passed explicitly); the default even split passes ``vocab_start_index=None`` (rank·V/P).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from distill_lm import CONTEXT, VOCAB, ByteMLP, batch, examples_at, load_text, perplexity  # noqa: E402

import kdfast  # noqa: E402
from kdfast.parallel.vocab import record_collectives  # noqa: E402

TEMPERATURE, ALPHA, LR, BATCH, CLIP = 2.0, 0.5, 2e-3, 1024, 1.0


class VocabParallelHead(nn.Module):
    """Rows [start, stop) of a vocabulary head (ColumnParallelLinear: the output features split);
    ``forward`` gives this rank's logit columns."""

    def __init__(self, full: nn.Linear, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop
        self.weight = nn.Parameter(full.weight.detach()[start:stop].clone())
        self.bias = nn.Parameter(full.bias.detach()[start:stop].clone())

    def forward(self, hidden):
        return F.linear(hidden, self.weight, self.bias)


def shard_model(full: ByteMLP, start: int, stop: int) -> ByteMLP:
    """A copy of ``full`` with its head replaced by this rank's rows: ``hidden`` is unchanged,
    ``forward`` returns the local logit columns."""
    model = copy.deepcopy(full)
    model.head = VocabParallelHead(full.head, start, stop)
    return model


def split_sizes(spec: str, world: int) -> list[int]:
    if spec == "even":
        return [VOCAB // world + (1 if r < VOCAB % world else 0) for r in range(world)]
    sizes = [int(s) for s in spec.split(",")]
    if len(sizes) != world or sum(sizes) != VOCAB or min(sizes) < 0:
        raise SystemExit(f"--split {spec}: need {world} sizes summing to {VOCAB}")
    return sizes


def body_parameters(model: ByteMLP):
    return [p for name, p in model.named_parameters() if not name.startswith("head.")]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def spread_over_ranks(vector: torch.Tensor, group) -> float:
    """max over ranks of |vector_r − vector_0| (all-gathered): 0 when every rank holds the same."""
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, vector.contiguous(), group=group)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def tp_loss(student: ByteMLP, teacher: ByteMLP, x, y, group, start_arg):
    h_s = student.hidden(x)
    with torch.no_grad():
        h_t = teacher.hidden(x)
    return kdfast.fused_linear_kd_loss(h_s, student.head.weight, h_t, teacher.head.weight, y,
                                       student_bias=student.head.bias, teacher_bias=teacher.head.bias,
                                       temperature=TEMPERATURE, alpha=ALPHA,
                                       vocab_parallel_group=group, vocab_start_index=start_arg)


def single_loss(student: ByteMLP, teacher: ByteMLP, x, y):
    """The same loss on the full heads, one process (``distill_lm.student_loss(\"kd\", ...)``)."""
    h_s = student.hidden(x)
    with torch.no_grad():
        h_t = teacher.hidden(x)
    return kdfast.fused_linear_kd_loss(h_s, student.head.weight, h_t, teacher.head.weight, y,
                                       student_bias=student.head.bias, teacher_bias=teacher.head.bias,
                                       temperature=TEMPERATURE, alpha=ALPHA)


def clip_tp_(student: ByteMLP, max_norm: float, group) -> torch.Tensor:
    """``nn.utils.clip_grad_norm_`` on the global norm: the replicated bodies counted once, the
    head shards summed over the group (one scalar all-reduce)."""
    body = torch.stack([p.grad.pow(2).sum() for p in body_parameters(student)]).sum()
    head = torch.stack([p.grad.pow(2).sum() for p in student.head.parameters()]).sum()
    dist.all_reduce(head, group=group)
    total = (body + head).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in student.parameters():
        p.grad.mul_(coef)
    return total


@torch.no_grad()
def tp_perplexity(model: ByteMLP, data: torch.Tensor, group) -> float:
    """exp(mean next-byte CE) with the vocabulary split: max over ranks, then one SUM of the
    stacked (Σ exp(z − M), label logit from its owner, 0 elsewhere) per row."""
    head = model.head
    positions = torch.arange(CONTEXT, len(data))
    total = 0.0
    for i in range(0, len(positions), 8192):
        x, y = examples_at(data, positions[i:i + 8192])
        z = model(x)  # [n, V_r]
        m = z.max(-1).values if z.shape[-1] else z.new_full(z.shape[:1], -math.inf)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        owned = (y >= head.start) & (y < head.stop)
        label = z.gather(-1, torch.where(owned, y - head.start, 0).unsqueeze(-1)).squeeze(-1) if z.shape[-1] \
            else torch.zeros_like(m)
        sums = torch.stack([torch.exp(z - m.unsqueeze(-1)).sum(-1), torch.where(owned, label, 0.0)], dim=-1)
        dist.all_reduce(sums, group=group)
        total += (m + sums[:, 0].log() - sums[:, 1]).sum().item()
    return math.exp(total / len(positions))


def gather_full(model: ByteMLP, full_like: ByteMLP, group) -> ByteMLP:
    """The full model reassembled from every rank's head shard (the bodies are replicated)."""
    shards = [None] * dist.get_world_size(group)
    mine = (model.head.start, model.head.weight.detach(), model.head.bias.detach())
    dist.all_gather_object(shards, mine, group=group)
    full = copy.deepcopy(full_like)
    full.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, strict=False)
    with torch.no_grad():
        for start, w, b in shards:
            full.head.weight[start:start + len(w)] = w
            full.head.bias[start:start + len(b)] = b
    return full


def train_teacher(data, steps):
    """``distill_lm``'s teacher, trained identically on every rank (plain CE, full head)."""
    torch.manual_seed(0)
    model = ByteMLP(CONTEXT, 32, [512, 256])
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = batch(data, BATCH, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return model.eval().requires_grad_(False)


def check_against_single_process(student_full, teacher_full, student, teacher, data, group, start_arg, rank, say):
    """One batch: the tensor-parallel loss and gradients vs the single-process loss on the full heads."""
    gen = torch.Generator().manual_seed(12345)
    x, y = batch(data, BATCH, gen)
    reference = copy.deepcopy(student_full)
    loss_single = single_loss(reference, teacher_full, x, y)
    loss_single.backward()
    tp = copy.deepcopy(student)
    with record_collectives() as log:
        loss_tp = tp_loss(tp, teacher, x, y, group, start_arg)
        loss_tp.backward()
    head = tp.head
    d_loss = (loss_tp - loss_single).abs().item()
    d_body = (flat(p.grad for p in body_parameters(tp)) - flat(p.grad for p in body_parameters(reference))).abs().max()
    d_head = max((head.weight.grad - reference.head.weight.grad[head.start:head.stop]).abs().max().item(),
                 (head.bias.grad - reference.head.bias.grad[head.start:head.stop]).abs().max().item())
    worst = torch.tensor([d_loss, d_body.item(), d_head])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    spread = spread_over_ranks(flat(p.grad for p in body_parameters(tp)), group)
    scale = max(1.0, abs(loss_single.item()))
    ok = worst[0] <= 1e-5 * scale and worst[1] <= 1e-5 and worst[2] <= 1e-5 and spread == 0.0
    say(f"TP check (one batch of {BATCH}, rank 0 loss): tensor-parallel {loss_tp.item():.7f} vs single-process "
        f"fused_linear_kd_loss on the full heads {loss_single.item():.7f}: |difference| {d_loss:.2e} "
        f"(max over ranks {worst[0]:.2e}); max |grad difference| bodies {worst[1]:.2e}, head shards {worst[2]:.2e}; "
        f"bodies' gradients across ranks: max |g_r - g_0| = {spread:.1e} -> {'PASSED' if ok else 'FAILED'}")
    say("  collectives of one loss forward + backward (kdfast.parallel.vocab.record_collectives): "
        + ", ".join(f"{r.op.upper()} {list(r.shape)} {str(r.dtype).replace('torch.', '')}" for r in log)
        + f" = {sum(r.bytes for r in log):,} bytes")
    if not ok:
        raise SystemExit(f"rank {rank}: the tensor-parallel loss differs from the single-process loss")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-kb", type=int, default=400)
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--student-steps", type=int, default=800)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--split", default="even", help="'even' or the per-rank vocabulary sizes, e.g. 150,106")
    ap.add_argument("--threads", type=int, default=1, help="per rank")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the single-process student trained by rank 0 for comparison")
    ap.add_argument("--quick", action="store_true", help="64 KB of text, 20 steps each, a log line every 5 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.text_kb, args.teacher_steps, args.student_steps, args.log_every = 64, 20, 20, 5
    torch.set_num_threads(args.threads)
    tmp = None
    if "RANK" in os.environ:  # torch.distributed.run
        dist.init_process_group("gloo")
    else:  # a plain `python examples/distill_lm_tp.py`: a 1-rank group through a file store
        tmp = tempfile.TemporaryDirectory()
        dist.init_process_group("gloo", init_method=f"file://{tmp.name}/store", rank=0, world_size=1)
    group = dist.group.WORLD  # in a real job: the tensor-parallel subgroup
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    say = print if rank == 0 else (lambda *a, **k: None)
    sizes = split_sizes(args.split, world)
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    start_arg = None if args.split == "even" and len(set(sizes)) == 1 else start
    t_start = time.perf_counter()

    data = load_text(args.text_kb)
    cut = int(0.9 * len(data))
    train_data, val_data = data[:cut], data[cut:]
    starts = "None: rank * V/P" if start_arg is None else f"explicit {[sum(sizes[:r]) for r in range(world)]}"
    say(f"{world} ranks (gloo, {args.threads} thread each); vocabulary {VOCAB} split {sizes} "
        f"(vocab_start_index={starts}); "
        f"text {len(data) // 1024} KB ({len(train_data)} train / {len(val_data)} validation bytes)")

    t0 = time.perf_counter()
    teacher_full = train_teacher(train_data, args.teacher_steps)
    spread = spread_over_ranks(flat(teacher_full.parameters()), group)
    assert spread == 0.0, f"the ranks trained different teachers ({spread})"
    say(f"teacher (MLP 512-512-256, trained on every rank identically, {args.teacher_steps} steps, "
        f"{time.perf_counter() - t0:.0f} s): validation perplexity {perplexity(teacher_full, val_data):.3f}")
    teacher = shard_model(teacher_full, start, stop).requires_grad_(False)

    torch.manual_seed(1)  # distill_lm's student initialisation
    student_full = ByteMLP(CONTEXT, 8, [64])
    student = shard_model(student_full, start, stop)
    check_against_single_process(student_full, teacher_full, student, teacher, train_data, group, start_arg, rank, say)

    opt = torch.optim.Adam(student.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(1)  # distill_lm's student batches
    losses, t0 = [], time.perf_counter()
    say(f"student (MLP 128-64, head rows [{start}, {stop}) on rank 0): fused_linear_kd_loss T={TEMPERATURE}, "
        f"alpha={ALPHA}, vocab_parallel_group, {args.student_steps} steps")
    for step in range(1, args.student_steps + 1):
        x, y = batch(train_data, BATCH, gen)
        loss = tp_loss(student, teacher, x, y, group, start_arg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step % args.log_every == 0 or step == args.student_steps:
            spread = spread_over_ranks(flat(p.grad for p in body_parameters(student)), group)
            assert spread == 0.0, f"step {step}: the bodies' gradients differ across ranks ({spread})"
        norm = clip_tp_(student, CLIP, group)
        opt.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.student_steps:
            window = losses[-args.log_every:]
            say(f"  step {step:4d}  loss {sum(window) / len(window):.4f} (mean of the last {len(window)})  "
                f"grad norm {norm.item():.3f}  "
                f"bodies' gradients identical on all ranks: max |g_r - g_0| = {spread:.1e}  "
                f"{(time.perf_counter() - t0) / step * 1000:.0f} ms/step")
    tp_seconds = time.perf_counter() - t0
    spread = spread_over_ranks(flat(body_parameters(student)), group)
    assert spread == 0.0, f"the bodies' parameters drifted apart ({spread})"
    ppl_tp = tp_perplexity(student, val_data, group)
    assembled = gather_full(student, student_full, group)
    say(f"tensor-parallel student: {tp_seconds:.1f} s ({tp_seconds / args.student_steps * 1000:.0f} ms/step); "
        f"bodies' parameters identical on all ranks (max |p_r - p_0| = {spread:.1e})")
    say(f"final validation perplexity (vocabulary-parallel CE): {ppl_tp:.4f}  "
        f"[reassembled full model, distill_lm.perplexity: {perplexity(assembled, val_data):.4f}]")

    if args.reference and rank == 0:
        t0 = time.perf_counter()
        reference = copy.deepcopy(student_full)
        opt = torch.optim.Adam(reference.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(1)
        for _ in range(args.student_steps):
            x, y = batch(train_data, BATCH, gen)
            loss = single_loss(reference, teacher_full, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
            opt.step()
        seconds = time.perf_counter() - t0
        diff = (flat(reference.parameters()) - flat(assembled.parameters())).abs().max().item()
        say(f"single-process reference (rank 0, full heads, same init / batches / loss): {seconds:.1f} s "
            f"({seconds / args.student_steps * 1000:.0f} ms/step), validation perplexity "
            f"{perplexity(reference, val_data):.4f}; max |parameter difference| from the tensor-parallel student "
            f"{diff:.2e}")
    dist.barrier(group=group)
    say(f"total wall time {time.perf_counter() - t_start:.0f} s")
    dist.destroy_process_group()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
