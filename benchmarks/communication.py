"""Communication per step of tensor-parallel (vocabulary-parallel) distillation: kdfast vs gathering the logits.

    python -m benchmarks.communication                       # N=8192, V=128256, P=8, H=4096
    python -m benchmarks.communication --world 2             # count in a 2-process gloo group instead of 1

The collectives are **counted, not assumed**: the losses run on a small problem (16 rows) inside
``kdfast.parallel.vocab.record_collectives()`` in a real gloo process group (1 process by
default: the same calls, shapes and dtypes are issued whatever the group size; ``--world 2``
spawns two ranks with an uneven vocabulary split and checks that both record the same list).
Every collective of a row loss carries a [rows, m] tensor (m values per row), so its payload at N
rows is N·m·(bytes per value); the fused-linear losses issue the row-loss collectives once per
chunk of rows plus one SUM of the [N, H] hidden-state gradient per call.

Bytes *sent per rank* use the standard ring (bandwidth-optimal) costs on P ranks:

    all-reduce of S bytes          2·(P − 1)/P · S
    all-gather to S_total bytes    (P − 1)/P · S_total
    reduce-scatter of S bytes      (P − 1)/P · S

The naive baseline gathers the logits: every rank all-gathers its [N, V/P] student and teacher
logit shards into [N, V] (the top-k loss gathers the student only: its teacher is k replicated
(id, log-prob) pairs) and computes the ordinary loss redundantly. In the backward the gradient of
the gathered student logits is then identical on every rank, so a careful user slices its own
columns (no communication); a user who gathers with the autograd-aware
``torch.distributed.nn.functional.all_gather`` gets a reduce-scatter of the [N, V] gradient in the
backward instead (and must divide the loss by P). Both are listed. The fused-linear naive baseline
forms its logit shards with a local GEMM, gathers them the same way, and needs the same [N, H]
hidden-state all-reduce as kdfast in the backward (it is the input gradient of any
column-parallel layer).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

import kdfast
from kdfast.parallel.vocab import record_collectives

HERE = os.path.dirname(os.path.abspath(__file__))
RING = {"all-reduce": "2(P−1)/P·S", "all-gather": "(P−1)/P·S_total", "reduce-scatter": "(P−1)/P·S"}

#: the collectives per call that kdfast.parallel.vocab documents (its module docstring's table)
DOCUMENTED = {"kd": ["max", "sum"], "kd_ce": ["max", "sum"], "reverse_kl": ["max", "sum"],
              "jsd": ["max", "sum", "sum"], "skd": ["max", "sum", "sum"], "topk": ["max", "sum"]}


def ring_bytes(kind: str, size: float, world: int) -> float:
    """Bytes sent per rank by a ring collective on ``world`` ranks (``size``: the all-reduce's or
    reduce-scatter's input, or the all-gather's total output)."""
    factor = (world - 1) / world
    return 2 * factor * size if kind == "all-reduce" else factor * size


# ------------------------------------------------------------------------------- the real calls
@dataclass(frozen=True)
class Case:
    key: str
    label: str
    gathered: int          #: [N, V] logit tensors a naive implementation all-gathers (student, teacher)
    fused: bool = False


CASES = [
    Case("kd", "`kd_loss` (forward KL, T=4, α=1)", 2),
    Case("kd_ce", "`kd_loss` + CE on labels (α=0.5)", 2),
    Case("reverse_kl", "`divergence_loss(divergence=\"reverse_kl\")`", 2),
    Case("jsd", "`divergence_loss(divergence=\"jsd\", beta=0.5)`", 2),
    Case("skd", "`skd_loss` (α=0.5, labels)", 2),
    Case("topk", "`topk_divergence_loss` (k=64, tail=\"renormalize\")", 1),
    Case("fused_kd", "`fused_linear_kd_loss` (α=0.5, labels), fp32 hidden states and heads", 2, fused=True),
    Case("fused_kd_bf16", "`fused_linear_kd_loss` (α=0.5, labels), bf16 hidden states and heads", 2, fused=True),
]


@contextlib.contextmanager
def process_group():
    """The default process group, initialised as a 1-process gloo group (file store, no TCP) when
    none is; destroyed afterwards if it was created here."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def record_counts(group=None, rows: int = 16, vocab: int = 96, hidden: int = 8, k: int = 64, chunk_size: int = 5,
                  local: slice | None = None, dtype=torch.float32) -> dict:
    """{case key: [CollectiveRecord, ...]} for one forward + backward of each case on this rank's
    columns ``local`` of a seeded [rows, vocab] problem (all of them by default), in ``group``."""
    local = slice(0, vocab) if local is None else local
    start = local.start
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(rows, vocab, generator=gen, dtype=torch.float64).to(dtype)
    teacher = torch.randn(rows, vocab, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    top = torch.log_softmax(teacher.double(), -1).topk(k)
    h_s = torch.randn(rows, hidden, generator=gen, dtype=torch.float64).to(dtype)
    h_t = torch.randn(rows, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w_s = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64).to(dtype)[local]
    w_t = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64).to(dtype)[local]
    tp = dict(vocab_parallel_group=group, vocab_start_index=start)

    def logits():
        return student[:, local].clone().requires_grad_(), teacher[:, local]

    def call(key):
        if key.startswith("fused_kd"):
            cast = (lambda x: x.bfloat16()) if key.endswith("bf16") else (lambda x: x)
            hidden_states, weight = cast(h_s).requires_grad_(), cast(w_s).requires_grad_()
            return kdfast.fused_linear_kd_loss(hidden_states, weight, cast(h_t), cast(w_t), labels, alpha=0.5,
                                               chunk_size=chunk_size, **tp)
        s, t = logits()
        if key == "kd":
            return kdfast.kd_loss(s, t, **tp)
        if key == "kd_ce":
            return kdfast.kd_loss(s, t, labels, alpha=0.5, **tp)
        if key == "reverse_kl":
            return kdfast.divergence_loss(s, t, divergence="reverse_kl", **tp)
        if key == "jsd":
            return kdfast.divergence_loss(s, t, divergence="jsd", beta=0.5, **tp)
        if key == "skd":
            return kdfast.skd_loss(s, t, labels, alpha=0.5, **tp)
        if key == "topk":
            return kdfast.topk_divergence_loss(s, top.indices, top.values.to(dtype), **tp)
        raise KeyError(key)

    counts = {}
    for case in CASES:
        with record_collectives() as log:
            call(case.key).backward()  # the backward is recorded too: it must add nothing
        counts[case.key] = list(log)
    return counts


def per_row_layout(records: list, rows: int, hidden: int, chunk_size: int, fused: bool) -> dict:
    """The recorded collectives as a per-row layout: for a row loss [(op, values per row, dtype)];
    for a fused-linear loss the same per chunk plus the [rows, hidden] SUM."""
    layout, hidden_sum = list(records), None
    if fused:
        hidden_sum = layout.pop()
        assert hidden_sum.op == "sum" and hidden_sum.shape == (rows, hidden), hidden_sum
        chunks = math.ceil(rows / chunk_size)
        assert len(layout) % chunks == 0, (len(layout), chunks)
        per_chunk = len(layout) // chunks
        first = layout[:per_chunk]
        for i in range(chunks):  # every chunk issues the same collectives, [chunk rows, m] each
            chunk_rows = min(chunk_size, rows - i * chunk_size)
            for a, b in zip(first, layout[i * per_chunk:(i + 1) * per_chunk]):
                assert (a.op, a.shape[1:], a.dtype) == (b.op, b.shape[1:], b.dtype) and b.shape[0] == chunk_rows
        layout = first
        rows = min(chunk_size, rows)
    out = []
    for r in layout:
        assert r.shape[0] == rows and len(r.shape) == 2, (r, rows)
        out.append((r.op, r.shape[1], r.dtype))
    return dict(row=out, hidden=None if hidden_sum is None else hidden_sum.dtype)


def default_chunk_size(rows: int, local_vocab: int) -> int:
    """The fused-linear vocabulary-parallel default chunk (kdfast/parallel/linear.py)."""
    return max(1, min(rows, max(512, (1 << 24) // max(local_vocab, 1))))


def nbytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def table(counts: dict, n: int, vocab: int, world: int, hidden: int, *, rows: int = 16, small_hidden: int = 8,
          chunk_size: int = 5) -> list:
    """One dict per case at N = n rows, vocabulary V = vocab, P = world ranks, hidden size H."""
    out = []
    local_vocab = math.ceil(vocab / world)
    for case in CASES:
        layout = per_row_layout(counts[case.key], rows, small_hidden, chunk_size, case.fused)
        chunks = math.ceil(n / default_chunk_size(n, local_vocab)) if case.fused else 1
        stats_payload = sum(n * m * nbytes(dt) for _, m, dt in layout["row"])
        row = dict(key=case.key, label=case.label, ops=[op for op, _, _ in layout["row"]],
                   values_per_row=[m for _, m, _ in layout["row"]],
                   dtypes=sorted({str(dt).replace("torch.", "") for _, _, dt in layout["row"]}),
                   chunks=chunks, collectives=chunks * len(layout["row"]) + (1 if case.fused else 0),
                   stats_payload=stats_payload, hidden_payload=0, hidden_dtype=None)
        if case.fused:
            row["hidden_payload"] = n * hidden * nbytes(layout["hidden"])
            row["hidden_dtype"] = str(layout["hidden"]).replace("torch.", "")
        row["sent"] = ring_bytes("all-reduce", stats_payload + row["hidden_payload"], world)
        row["sent_stats"] = ring_bytes("all-reduce", stats_payload, world)
        row["sent_hidden"] = ring_bytes("all-reduce", row["hidden_payload"], world)
        for name, size in (("bf16", 2), ("fp32", 4)):
            gather = case.gathered * ring_bytes("all-gather", n * vocab * size, world)
            backward = ring_bytes("reduce-scatter", n * vocab * size, world)
            extra = ring_bytes("all-reduce", n * hidden * size, world) if case.fused else 0.0
            row[f"naive_{name}"] = gather + extra
            row[f"naive_autograd_{name}"] = gather + backward + extra
        out.append(row)
    return out


def human(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def markdown(rows: list, n: int, vocab: int, world: int, hidden: int, counted_world: int) -> str:
    local_vocab = math.ceil(vocab / world)
    chunk = default_chunk_size(n, local_vocab)
    lines = [f"# Tensor-parallel KD: communication per rank per step (N={n}, V={vocab}, P={world}, H={hidden})", "",
             f"Collectives and per-row widths recorded by `kdfast.parallel.vocab.record_collectives()` around one "
             f"forward + backward of each loss in a {counted_world}-process gloo group (16 rows), scaled to N rows "
             f"(each collective carries [rows, m]). Statistics travel in the compute dtype (fp32 for fp32/bf16 "
             f"inputs; SKD's first-round Σz, Σz² in fp64). The backward issues no collective. Bytes sent per rank: "
             f"ring all-reduce {RING['all-reduce']}, all-gather {RING['all-gather']}, reduce-scatter "
             f"{RING['reduce-scatter']}.", "",
             "| loss | collectives per call | values per row (m per collective) | dtype | payload per call "
             "| sent per rank (ring) | naive all-gather of the logits, bf16 / fp32 | naive with autograd all_gather "
             "(+ reduce-scatter of ∂z), bf16 / fp32 | naive bf16 ÷ kdfast |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = " + ".join(op.upper() for op in r["ops"])
        widths = " + ".join(str(m) for m in r["values_per_row"])
        dtypes = "/".join(r["dtypes"])
        if r["hidden_payload"]:
            collectives = (f"{r['collectives']} = {r['chunks']} chunks × ({ops}) + SUM [N, H]")
            payload = f"{human(r['stats_payload'])} + {human(r['hidden_payload'])} ([N, H] {r['hidden_dtype']})"
            sent = f"{human(r['sent'])} ({human(r['sent_stats'])} statistics)"
            dtypes += f"; [N, H] {r['hidden_dtype']}"
        else:
            collectives = f"{r['collectives']} ({ops})"
            payload = human(r["stats_payload"])
            sent = human(r["sent"])
        lines.append(f"| {r['label']} | {collectives} | {widths} | {dtypes} | {payload} | {sent} | "
                     f"{human(r['naive_bf16'])} / {human(r['naive_fp32'])} | {human(r['naive_autograd_bf16'])} / "
                     f"{human(r['naive_autograd_fp32'])} | {r['naive_bf16'] / r['sent']:,.0f}× |")
    fused = next(r for r in rows if r["key"] == "fused_kd_bf16")
    half = ring_bytes("all-reduce", fused["hidden_payload"] / 2, world)
    lines += ["",
              f"Naive: every rank all-gathers the [N, V/P] student and teacher logit shards (top-k: the student "
              f"only), then computes the loss redundantly; its backward slices the rank's columns of the (replicated) "
              f"gradient for free, or, through `torch.distributed.nn.functional.all_gather`, reduce-scatters the "
              f"[N, V] gradient. The fused-linear naive baseline also needs the [N, H] hidden-state all-reduce "
              f"(the input gradient of a column-parallel head; counted in the logit dtype).",
              f"Fused-linear chunks: the default vocabulary-parallel chunk is max(512, 2^24 // V_local) rows = "
              f"{chunk} at V_local = {local_vocab}, so {fused['chunks']} chunks; the statistics' bytes do not "
              f"depend on the chunking, only the number of collectives does (pass `chunk_size=N` for "
              f"{fused['collectives'] - (fused['chunks'] - 1) * len(fused['ops'])} collectives).",
              f"kdfast all-reduces the [N, H] partial in {fused['hidden_dtype']} for bf16 hidden states (recorded "
              f"with bf16 inputs: the partial is accumulated in the compute dtype); in bf16, as Megatron's "
              f"column-parallel backward does, it would send {human(half)} per rank instead of "
              f"{human(fused['sent_hidden'])}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ processes
def _worker(rank: int, world: int, store: str, split: list, queue):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        start = sum(split[:rank])
        counts = record_counts(dist.group.WORLD, vocab=sum(split), local=slice(start, start + split[rank]))
        queue.put((rank, {k: [(r.op, r.shape, str(r.dtype)) for r in v] for k, v in counts.items()}))
    finally:
        dist.destroy_process_group()


def counts_in_group(world: int = 1) -> dict:
    """Record in a ``world``-process gloo group; with 2+ ranks (uneven split) every rank must record
    the same collectives, and rank 0's are returned."""
    if world == 1:
        with process_group() as group:
            return record_counts(group)
    import torch.multiprocessing as mp
    from kdfast.parallel.vocab import CollectiveRecord
    vocab = 96
    split = [vocab // world + (7 if r == 0 else 0) - (7 if r == world - 1 else 0) for r in range(world)]
    split[-1] += vocab - sum(split)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), split, queue), nprocs=world,
                           start_method="spawn")
        got = dict(queue.get() for _ in range(world))
    for rank in range(1, world):
        assert got[rank] == got[0], f"rank {rank} recorded other collectives than rank 0"
    return {k: [CollectiveRecord(op, tuple(shape), getattr(torch, dt.replace("torch.", ""))) for op, shape, dt in v]
            for k, v in got[0].items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192, help="N: tokens per step per tensor-parallel group")
    ap.add_argument("--vocab", type=int, default=128256, help="V (Llama 3)")
    ap.add_argument("--tp", type=int, default=8, help="P: tensor-parallel ranks")
    ap.add_argument("--hidden", type=int, default=4096, help="H: the student's hidden size")
    ap.add_argument("--world", type=int, default=1, help="processes of the gloo group the collectives are counted in")
    ap.add_argument("--out", default=None, help="markdown output (default benchmarks/results/communication_tp-kd_"
                                                "N{rows}-V{vocab}-P{tp}.md; '-' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    counts = counts_in_group(args.world)
    rows = table(counts, args.rows, args.vocab, args.tp, args.hidden)
    text = markdown(rows, args.rows, args.vocab, args.tp, args.hidden, args.world)
    print(text, end="")
    out = args.out or os.path.join(HERE, "results", f"communication_tp-kd_N{args.rows}-V{args.vocab}-P{args.tp}.md")
    if out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write(text)
        print(f"\nwritten to {os.path.relpath(out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
