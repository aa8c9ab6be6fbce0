"""Byte-level language-model distillation through kdfast's fused-linear KD and SKD, on CPU.

    python examples/distill_lm.py            # full run, a few minutes on 2 CPU cores
    python examples/distill_lm.py --quick    # smoke test: a few steps, small text

Text: the first ``--text-kb`` KB (default 400) of the concatenated ``*.py`` files in Python's
standard library directory (``os.path.dirname(os.__file__)``, sorted by name), read as bytes
(vocabulary 256). The last 10% is the validation text.

Networks: neural n-gram LMs over the previous 16 bytes (embedding, concatenated, ReLU MLP, linear
lm head over the 256 bytes; see ``ByteMLP``):
  teacher  embedding 32 (512 inputs) -> 512 -> 256 -> head; ``--teacher-steps`` (800) steps
  student  embedding 8 (128 inputs) -> 64 -> head;          ``--student-steps`` (800) steps
  Adam 2e-3, batches of 1024 random positions (seeded), gradient clipping at 1.0.

Students (same initialisation and batches):
  ce   cross-entropy on the student's logits (the baseline)
  kd   ``kdfast.fused_linear_kd_loss`` on (student hidden, student head) vs (teacher hidden, teacher
       head), T=2, alpha=0.5: 0.5*T^2*KL + 0.5*CE, the [tokens, 256] logits never materialised whole
  skd  ``kdfast.fused_linear_skd_loss``, T=4, multiplier=2, alpha=0.5 (package defaults otherwise).
       SKD's CE term is on the layer-normalised logits h = 2*LN(z), so this student's predictive
       distribution is softmax(h); its perplexity is reported both ways (raw z and h).

Validation perplexity = exp(mean next-byte CE) over every position of the validation text that
has 16 bytes of context.

Loss memory: the peak extra memory of one forward + backward of the loss alone (inputs already
allocated) for the fused path (``backend="auto"``: the C++ CPU kernels, chunked) and the
materialised path (``backend="reference"``: full student and teacher logits, then the reference
loss), at the training shape and at a synthetic LLM-like shape (2048 tokens, vocabulary 32768).
Two measurements, each in a fresh subprocess:
  profiler  the high-water mark of bytes held by torch's CPU allocator (torch.profiler memory
            events, summed in time order) -- exact for allocations torch makes;
  RSS       VmHWM - VmRSS from /proc after resetting the high-water mark (clear_refs) -- also sees
            memory allocated outside torch's allocator, but only page-granular and touched pages.
Results: ``examples/results/lm.csv`` and ``examples/results/lm.md``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import kdfast

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 256
sys.path.insert(0, os.path.dirname(HERE))  # the repository's benchmarks package
from benchmarks.memory import peak_step_bytes  # noqa: E402


def load_text(kb: int) -> torch.Tensor:
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    data, need = bytearray(), kb * 1024
    for path in files:
        with open(path, "rb") as fh:
            data += fh.read()
        if len(data) >= need:
            break
    return torch.frombuffer(bytearray(data[:need]), dtype=torch.uint8).long()


class ByteMLP(nn.Module):
    """A neural n-gram LM (Bengio et al. 2003 style): the previous ``context`` bytes, embedded and
    concatenated, go through a ReLU MLP whose last hidden layer feeds the lm head. Chosen over a
    GRU / Transformer because those ran at 1-5 s per step on this 2-core CPU; this is ~100x cheaper
    and the fused-linear losses only care about the hidden states and the head."""

    def __init__(self, context: int, embed: int, hidden: list[int]):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed)
        layers, width = [], context * embed
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, VOCAB)

    def hidden(self, contexts):  # [N, context] byte ids -> [N, H]: the states the lm head reads
        return self.body(self.embed(contexts).flatten(1))

    def forward(self, contexts):
        return self.head(self.hidden(contexts))


CONTEXT = 16


def examples_at(data: torch.Tensor, positions: torch.Tensor):
    """(previous CONTEXT bytes, next byte) at each position (positions >= CONTEXT)."""
    offsets = torch.arange(-CONTEXT, 0)
    return data[positions.unsqueeze(1) + offsets], data[positions]


def batch(data: torch.Tensor, size: int, gen: torch.Generator):
    return examples_at(data, torch.randint(CONTEXT, len(data), (size,), generator=gen))


def student_loss(method, student, teacher, x, y):
    if method == "ce":
        return F.cross_entropy(student(x), y)
    h_s = student.hidden(x)
    with torch.no_grad():
        h_t = teacher.hidden(x)
    args = (h_s, student.head.weight, h_t, teacher.head.weight, y)
    bias = dict(student_bias=student.head.bias, teacher_bias=teacher.head.bias)
    if method == "kd":
        return kdfast.fused_linear_kd_loss(*args, **bias, temperature=2.0, alpha=0.5)
    if method == "skd":
        return kdfast.fused_linear_skd_loss(*args, **bias, temperature=4.0, multiplier=2.0, alpha=0.5)
    raise ValueError(method)


def train(model, data, steps, seed, desc, loss_fn, lr=2e-3, batch_size=1024):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        x, y = batch(data, batch_size, gen)
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def perplexity(model, data, normalised=False):
    """exp(mean next-byte CE) over every position of ``data`` that has a full context."""
    positions = torch.arange(CONTEXT, len(data))
    total = 0.0
    for i in range(0, len(positions), 8192):
        x, y = examples_at(data, positions[i:i + 8192])
        z = model(x)
        if normalised:  # SKD's predictive logits: 2 * layernorm over the vocabulary (eps 1e-7)
            z = 2.0 * (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-7)
        total += F.cross_entropy(z, y, reduction="sum").item()
    return math.exp(total / len(positions))


# ---------------------------------------------------------------------------------------- memory
SHAPES = {"train (4096 tok, H 64/256, V 256)": (4096, 64, 256, 256),
          "LLM-like (2048 tok, H 256/512, V 32768)": (2048, 256, 512, 32768)}


def _measure_one(shape_name: str, backend: str, loss_name: str) -> dict:
    """Run in a fresh process: peak extra memory of one loss forward + backward."""
    torch.set_num_threads(1)
    n, hs, ht, v = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(n, hs, generator=gen).requires_grad_()
    w_s = (torch.randn(v, hs, generator=gen) / hs ** 0.5).requires_grad_()
    h_t, w_t = torch.randn(n, ht, generator=gen), torch.randn(v, ht, generator=gen) / ht ** 0.5
    y = torch.randint(0, v, (n,), generator=gen)
    fn = getattr(kdfast, f"fused_linear_{loss_name}_loss")

    def step():
        fn(h_s, w_s, h_t, w_t, y, alpha=0.5, backend=backend).backward()

    def rss_kb(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = rss_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    rss_peak = (rss_kb("VmHWM") - before) * 1024
    h_s.grad = w_s.grad = None
    peak = peak_step_bytes(step, device=torch.device("cpu"), live_bytes=0)
    gradients = (h_s.numel() + w_s.numel()) * 4
    logits = n * v * 4
    return dict(shape=shape_name, loss=loss_name, backend=backend, profiler_peak=peak, rss_peak=rss_peak,
                seconds=seconds, gradients_bytes=gradients, logits_bytes=logits)


def measure_memory() -> list[dict]:
    rows = []
    for shape in SHAPES:
        for loss in ("kd", "skd"):
            for backend in ("auto", "reference"):
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-one",
                                      json.dumps([shape, backend, loss])], capture_output=True, text=True,
                                     check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


# ------------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-kb", type=int, default=400)
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--student-steps", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1, help="1 by default: with other jobs on the 2 cores, 2 threads ran ~15x slower")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="64 KB of text, 20 steps each, no memory table")
    ap.add_argument("--measure-one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_one:
        print(json.dumps(_measure_one(*json.loads(args.measure_one))))
        return
    if args.quick:
        args.text_kb, args.teacher_steps, args.student_steps = 64, 20, 20
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    data = load_text(args.text_kb)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"text: {len(data) / 1024:.0f} KB of the standard library's *.py ({len(train_data)} train / "
          f"{len(val_data)} validation bytes)")

    torch.manual_seed(0)
    teacher = train(ByteMLP(CONTEXT, 32, [512, 256]), train_data, args.teacher_steps, 0, "teacher",
                    lambda m, x, y: F.cross_entropy(m(x), y))
    teacher.requires_grad_(False)
    results = [dict(model="teacher (MLP 512-512-256)", params=sum(p.numel() for p in teacher.parameters()),
                    val_ppl=perplexity(teacher, val_data), val_ppl_normalised=float("nan"),
                    train_seconds=time.perf_counter() - start)]
    print(f"teacher validation perplexity {results[0]['val_ppl']:.3f}")
    for method in ("ce", "kd", "skd"):
        t0 = time.perf_counter()
        torch.manual_seed(1)  # the same student initialisation for every method
        student = train(ByteMLP(CONTEXT, 8, [64]), train_data, args.student_steps, 1, f"student {method}",
                        lambda m, x, y, method=method: student_loss(method, m, teacher, x, y))
        row = dict(model=f"student (MLP 128-64) {method}", params=sum(p.numel() for p in student.parameters()),
                   val_ppl=perplexity(student, val_data),
                   val_ppl_normalised=perplexity(student, val_data, normalised=True) if method == "skd"
                   else float("nan"), train_seconds=time.perf_counter() - t0)
        results.append(row)
        print(f"{row['model']:<28} validation perplexity {row['val_ppl']:.3f}"
              + (f" (normalised logits {row['val_ppl_normalised']:.3f})" if method == "skd" else ""))

    memory = [] if args.quick else measure_memory()
    elapsed = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lm.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["table", "model_or_shape", "loss", "backend", "params", "val_ppl", "val_ppl_normalised",
                    "seconds", "profiler_peak_MiB", "rss_peak_MiB", "logits_MiB", "student_grads_MiB"])
        for r in results:
            w.writerow(["perplexity", r["model"], "", "", r["params"], f"{r['val_ppl']:.4f}",
                        f"{r['val_ppl_normalised']:.4f}", f"{r['train_seconds']:.1f}", "", "", "", ""])
        for m in memory:
            w.writerow(["loss_memory", m["shape"], m["loss"], m["backend"], "", "", "", f"{m['seconds']:.4f}",
                        f"{m['profiler_peak'] / 2**20:.2f}", f"{m['rss_peak'] / 2**20:.2f}",
                        f"{m['logits_bytes'] / 2**20:.2f}", f"{m['gradients_bytes'] / 2**20:.2f}"])
    lines = [f"# Byte-level LM distillation ({len(data) // 1024} KB of stdlib sources, {args.teacher_steps} teacher "
             f"/ {args.student_steps} student steps, {args.threads} CPU threads)", "",
             "| model | parameters | validation perplexity | train time (s) |", "|---|---|---|---|"]
    for r in results:
        ppl = f"{r['val_ppl']:.3f}"
        if not math.isnan(r["val_ppl_normalised"]):
            ppl += f" (raw logits); {r['val_ppl_normalised']:.3f} (normalised logits, SKD's own distribution)"
        lines.append(f"| {r['model']} | {r['params']:,} | {ppl} | {r['train_seconds']:.0f} |")
    if memory:
        lines += ["", "Peak extra memory of one loss forward + backward (MiB), 1 thread, fresh process each:", "",
                  "| shape | loss | path | torch allocator peak | RSS peak | time (s) | one [N, V] fp32 logits |",
                  "|---|---|---|---|---|---|---|"]
        for m in memory:
            path = "fused (cpu, chunked)" if m["backend"] == "auto" else "materialised (reference)"
            lines.append(f"| {m['shape']} | {m['loss']} | {path} | {m['profiler_peak'] / 2**20:.1f} | "
                         f"{m['rss_peak'] / 2**20:.1f} | {m['seconds']:.3f} | {m['logits_bytes'] / 2**20:.1f} |")
    lines += ["", f"Total wall time {elapsed:.0f} s."]
    with open(os.path.join(args.out, "lm.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
