"""Distil a Hugging Face causal LM with kdfast's KDTrainer, on CPU, from configs (no download).

    python examples/distill_hf.py            # full run, a few minutes on 2 CPU cores
    python examples/distill_hf.py --quick    # smoke test: a few steps, small text, small shapes

Text: the first ``--text-kb`` KB (default 256) of the concatenated ``*.py`` files of Python's
standard library (``os.path.dirname(os.__file__)``, sorted by name), read as bytes: vocabulary 256,
no tokenizer. Cut into sequences of 128 bytes; the last 10% is the validation text.

Models: ``transformers.LlamaForCausalLM`` built from configs with random initialisation:
  teacher  hidden 128, 2 layers, 4 heads, MLP 384; ``--teacher-steps`` (300) steps of plain CE
           with ``transformers.Trainer``
  student  hidden 64, 1 layer, 2 heads, MLP 192; ``--student-steps`` (300) steps, twice from the
           same initialisation and batches:
             ce  ``transformers.Trainer``, the model's own cross-entropy (the baseline)
             kd  ``kdfast.integrations.transformers.KDTrainer``: forward KL to the teacher at T = 1,
                 alpha = 0.5 (0.5·KL + 0.5·CE), neither model's logits materialised
  AdamW 3e-3, batches of 16 sequences, 1 thread by default (``--threads``).

Validation perplexity: exp(mean next-byte CE) over every predicted position of the validation text.

Loss memory: the peak bytes held by torch's CPU allocator (torch.profiler memory events, summed in
time order) during one distillation step -- student forward, teacher forward under no_grad, loss,
backward -- through kdfast (``causal_lm_distillation_loss``) and through the materialised path
(``model(...).logits`` of both models, then ``kdfast.divergence_loss(backend="reference")``, the
loss written in plain PyTorch). At the training shape (16 x 128 tokens, vocabulary 256) and at an
LLM-like vocabulary (the same architectures with vocabulary 32768, 8 x 256 tokens, random weights).
The report is printed and written to ``--out`` as ``distill_hf_cpu-<threads>t_<date>.txt``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import kdfast
from kdfast.integrations.transformers import KDTrainer, causal_lm_distillation_loss

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from distill_lm import load_text  # noqa: E402  (the same bytes of the standard library)
from benchmarks.memory import peak_step_bytes  # noqa: E402

SEQ = 128


class Sequences(torch.utils.data.Dataset):
    """Consecutive ``SEQ``-byte sequences; labels = input_ids (the model shifts them)."""

    def __init__(self, data: torch.Tensor):
        self.ids = data[:len(data) // SEQ * SEQ].view(-1, SEQ)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], labels=self.ids[i])


def llama(hidden: int, layers: int, heads: int, vocab: int = 256, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def teacher_model(vocab=256):
    return llama(128, 2, 4, vocab, seed=0)


def student_model(vocab=256):
    return llama(64, 1, 2, vocab, seed=1)


def training_args(out: str, steps: int, seed: int) -> TrainingArguments:
    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3,
                             weight_decay=0.0, warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine",
                             logging_steps=max(1, steps // 10), report_to=[], save_strategy="no", use_cpu=True,
                             bf16=False, disable_tqdm=True, seed=seed, data_seed=seed, dataloader_num_workers=0)


@torch.no_grad()
def perplexity(model, data: Sequences) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), 64):
        ids = data.ids[i:i + 64]
        loss = model(input_ids=ids, labels=ids).loss  # mean over the predicted positions
        total += loss.item() * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------- memory


def peak_bytes(step) -> int:
    """High-water mark of the bytes torch's CPU allocator holds during ``step()`` (the profiler's
    memory events: exact for torch's own allocations)."""
    return peak_step_bytes(step, device=torch.device("cpu"), live_bytes=0)


def measure_memory(vocab: int, batch: int, seq: int, student=None, teacher=None) -> dict:
    student = student if student is not None else student_model(vocab)
    teacher = teacher if teacher is not None else teacher_model(vocab)
    student.train()
    teacher.eval().requires_grad_(False)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids, labels=ids)
    options = dict(divergence="forward_kl", alpha=0.5)

    def fused():
        causal_lm_distillation_loss(student, teacher, inputs, **options).backward()

    def materialised():
        student_logits = student(input_ids=ids).logits[:, :-1]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits[:, :-1]
        kdfast.divergence_loss(student_logits, teacher_logits, ids[:, 1:], backend="reference", **options).backward()

    rows = {}
    for name, step in (("fused (kdfast)", fused), ("materialised", materialised)):
        step()  # warm-up: first-call allocations (kernels, caches) are not the step's
        student.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        student.zero_grad(set_to_none=True)
        rows[name] = dict(peak=peak_bytes(step), seconds=seconds)
        student.zero_grad(set_to_none=True)
    rows["logits_bytes"] = batch * seq * vocab * 4
    return rows


# ------------------------------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-kb", type=int, default=256)
    ap.add_argument("--teacher-steps", type=int, default=900)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 by default: other jobs share the 2 cores; set 2 on an idle machine")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="32 KB of text, 6 steps each, small memory shapes")
    args = ap.parse_args(argv)
    if args.quick:
        args.text_kb, args.teacher_steps, args.student_steps = 32, 6, 6
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="distill_hf_")  # the Trainers' output_dir: nothing is saved there

    data = load_text(args.text_kb)
    split = int(0.9 * len(data))
    train, valid = Sequences(data[:split]), Sequences(data[split:])
    lines = [f"# Hugging Face distillation with kdfast.integrations.transformers.KDTrainer "
             f"({datetime.date.today().isoformat()}, {args.threads} CPU thread(s), torch {torch.__version__}, "
             f"transformers {transformers.__version__})", "",
             f"text: {len(data) // 1024} KB of the standard library's *.py as bytes: {len(train)} train / "
             f"{len(valid)} validation sequences of {SEQ}", ""]
    print("\n".join(lines), flush=True)

    t0 = time.perf_counter()
    teacher = teacher_model()
    Trainer(model=teacher, args=training_args(scratch, args.teacher_steps, 0), train_dataset=train).train()
    teacher.eval().requires_grad_(False)
    results = [("teacher (Llama 128x2, CE)", sum(p.numel() for p in teacher.parameters()), perplexity(teacher, valid),
                time.perf_counter() - t0)]
    print(f"{results[-1][0]:<34} validation perplexity {results[-1][2]:.3f}", flush=True)
    initial = perplexity(student_model(), valid)
    print(f"{'student at initialisation':<34} validation perplexity {initial:.3f}", flush=True)

    for method in ("ce", "kd"):
        t0 = time.perf_counter()
        student = student_model()
        training = training_args(scratch, args.student_steps, 1)
        if method == "ce":
            trainer = Trainer(model=student, args=training, train_dataset=train)
        else:
            trainer = KDTrainer(model=student, teacher_model=teacher, args=training, train_dataset=train,
                                divergence="forward_kl", temperature=1.0, alpha=0.5)
        trainer.train()
        results.append((f"student (Llama 64x1) {method}", sum(p.numel() for p in student.parameters()),
                        perplexity(student, valid), time.perf_counter() - t0))
        print(f"{results[-1][0]:<34} validation perplexity {results[-1][2]:.3f}", flush=True)

    table = ["", "| model | parameters | validation perplexity | train time (s) |", "|---|---|---|---|",
             f"| student at initialisation | {results[1][1]:,} | {initial:.3f} | 0 |"]
    table += [f"| {name} | {params:,} | {ppl:.3f} | {seconds:.0f} |" for name, params, ppl, seconds in results]

    shapes = [("training shape: 16 x 128 tokens, vocabulary 256", 256, 16, SEQ, student, teacher),
              ("LLM-like vocabulary: 8 x 256 tokens, vocabulary 32768", 32768, 8, 256, None, None)]
    if args.quick:
        shapes = [("quick: 2 x 64 tokens, vocabulary 256", 256, 2, 64, student, teacher),
                  ("quick: 2 x 64 tokens, vocabulary 8192", 8192, 2, 64, None, None)]
    table += ["", "Peak memory held by torch's CPU allocator during one distillation step (student forward, "
              "teacher forward, loss, backward), MiB:", "",
              "| shape | kdfast (fused) | materialised logits | one [tokens, vocab] fp32 tensor | step time fused / "
              "materialised (s) |", "|---|---|---|---|---|"]
    for name, vocab, batch, seq, s, t in shapes:
        m = measure_memory(vocab, batch, seq, s, t)
        fused, full = m["fused (kdfast)"], m["materialised"]
        table.append(f"| {name} | {fused['peak'] / 2**20:.1f} | {full['peak'] / 2**20:.1f} | "
                     f"{m['logits_bytes'] / 2**20:.1f} | {fused['seconds']:.3f} / {full['seconds']:.3f} |")
    table += ["", f"Total wall time {time.perf_counter() - start:.0f} s."]
    print("\n".join(table), flush=True)

    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    report = os.path.join(args.out, f"distill_hf_cpu-{args.threads}t_{datetime.date.today().isoformat()}.txt")
    if args.quick:
        report = os.path.join(args.out, "distill_hf_quick.txt")
    with open(report, "w") as fh:
        fh.write("\n".join(lines + table) + "\n")
    print(f"peak memory and perplexity written to {report}")


if __name__ == "__main__":
    main()
