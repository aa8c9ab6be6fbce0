"""``python -m benchmarks.llm``: LLM distillation on output projections, kdfast against TRL, Liger
and PyTorch, side by side in one run.

Every provider computes the same thing from the same inputs: the student's hidden states
``[N, H]`` and LM head ``[V, H]`` (both with gradients), the teacher's hidden states and LM head
(frozen), then one divergence of ``softmax(z/T)`` between the two models' logits ``z = h @ W.T``,
averaged over the N rows (no T² factor), forward and backward. Divergences: forward KL, reverse KL and
generalized JSD(β = 0.5) (TRL's β convention: 0 is forward KL, 1 reverse KL).

Providers (each skipped, with the reason, where it cannot run):

* ``gemm-floor`` — the four unchunked matmuls alone (two projections, the hidden-state gradient
  ``dz @ W_s``, the weight gradient ``dzᵀ @ h_s``) into preallocated outputs: the time no
  fused-linear loss can beat (the memory floor is the gradients themselves).
* ``kdfast`` — ``kdfast.fused_linear_divergence_loss`` (``--kdfast-backend``, default ``auto``).
* ``trl`` — TRL's fused kernel ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (off
  CUDA/XPU its vocabulary tiles are folded in PyTorch: the CPU path), per-token divergences / N.
* ``liger`` — Liger-Kernel's ``chunked_loss.LigerFusedLinearJSDLoss`` (PyTorch, token chunks of
  1024 under ``torch.compile``; ``--no-compile``: eager), hard-loss weight 0, β = 0 / 0.5 / 1.
* ``torch-compile`` / ``torch-eager`` — the materialised path, full logits ``h @ W.T``, then the
  divergence in plain PyTorch (log-softmax, then the closed form), with and without
  ``torch.compile``.
* ``linear-ce`` — ``torch.nn.functional.linear_cross_entropy`` with the teacher's probabilities
  as soft targets (forward KL only: soft-target CE = forward KL + the teacher's entropy, the same
  gradient); the teacher's projection and softmax are inside the timed step.
* ``kdfast-topk-k<k>`` — ``kdfast.fused_linear_topk_divergence_loss`` against the teacher's top-k
  log-probabilities (an offline teacher: its top-k is computed once, outside the timed step), for
  ``--topk`` k values, where kdfast has it.

Time: ``benchmarks.timing.time_fn`` (torch.utils.benchmark, median and 20th/80th percentiles of
forward+backward; at least three samples). Memory: ``benchmarks.memory.peak_step_bytes`` (torch
profiler memory events of one step), reported as the peak on top of the inputs. Ratios: p50 time
over the GEMM floor's, and over kdfast's for the same divergence.

Writes ``benchmarks/results/kdfast-llm[-quick]_<device>_<date>.{csv,md}`` and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import importlib.metadata
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import kdfast

from .memory import peak_step_bytes
from .report import markdown_table, text_table
from .suite import device_name, device_tag
from .timing import num_threads, time_fn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: name → TRL/Liger β (0: forward KL, 1: reverse KL, else generalized JSD)
DIVERGENCES = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}
#: N, H, V: the issue's CPU target; --quick is a smoke test of every provider (< 1 min on 2 cores)
SHAPES = {"full": (4096, 1024, 32000), "quick": (256, 128, 2048)}
PROVIDERS = ("gemm-floor", "kdfast", "trl", "liger", "torch-compile", "torch-eager", "linear-ce", "kdfast-topk")
TOPK = (64, 128, 1024)
LIGER_CHUNK = 1024


class Skip(Exception):
    """A provider that cannot run here (not installed, no such form): a note, not a failure."""


@dataclass
class Inputs:
    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    temperature: float

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [self.student_hidden, self.student_weight]

    @property
    def rows(self) -> int:
        return self.student_hidden.shape[0]

    def teacher_logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher_hidden @ self.teacher_weight.T

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.student_hidden, self.student_weight, self.teacher_hidden, self.teacher_weight))


def make_inputs(rows: int, hidden: int, vocab: int, teacher_hidden: int, dtype: torch.dtype, device: torch.device,
                temperature: float, seed: int = 0) -> Inputs:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)
    # weights ~ N(0, 1/H): logits of standard deviation ~1, as a trained LM head gives
    return Inputs(randn(rows, hidden).requires_grad_(), randn(vocab, hidden, scale=hidden ** -0.5).requires_grad_(),
                  randn(rows, teacher_hidden), randn(vocab, teacher_hidden, scale=teacher_hidden ** -0.5), temperature)


# --------------------------------------------------------------------------- the plain-PyTorch divergence


def torch_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                     temperature: float) -> torch.Tensor:
    """Generalized JSD(β) of softmax(z/T), β = 0 / 1 the forward / reverse KL, mean over rows: what
    a user writes in PyTorch (log-softmax of both, then the closed form)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        per_row = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif beta == 1.0:
        per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        per_row = (beta * (log_q.exp() * (log_q - log_m)) + (1 - beta) * (log_p.exp() * (log_p - log_m))).sum(-1)
    return per_row.mean()


# --------------------------------------------------------------------------- providers
# Each builder returns (loss closure, note); raising Skip leaves the provider out with the reason.


def _gemm_floor(inputs: Inputs, divergence: str, beta: float, options: dict):
    hs, ws, ht, wt = inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden, inputs.teacher_weight
    with torch.no_grad():
        zs = torch.empty(hs.shape[0], ws.shape[0], dtype=hs.dtype, device=hs.device)
        zt = torch.empty(ht.shape[0], wt.shape[0], dtype=ht.dtype, device=ht.device)
        dz = torch.randn_like(zs) * 1e-3
        grad_hidden, grad_weight = torch.empty_like(hs), torch.empty_like(ws)

    def step():
        with torch.no_grad():
            torch.mm(hs, ws.T, out=zs)
            torch.mm(ht, wt.T, out=zt)
            torch.mm(dz, ws, out=grad_hidden)
            torch.mm(dz.T, hs, out=grad_weight)
    return step, "4 matmuls into preallocated outputs (not a loss)"


def _kdfast(inputs: Inputs, divergence: str, beta: float, options: dict):
    loss_fn = getattr(kdfast, "fused_linear_divergence_loss", None)
    if loss_fn is None:
        raise Skip("kdfast.fused_linear_divergence_loss does not exist in this kdfast")
    backend = options["kdfast_backend"]

    def loss():
        return loss_fn(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden, inputs.teacher_weight,
                       divergence=divergence, beta=beta, temperature=inputs.temperature, backend=backend)
    return loss, f"backend={backend}"


def _trl(inputs: Inputs, divergence: str, beta: float, options: dict):
    try:
        chunked = importlib.import_module("trl.kernels.chunked_divergence")
    except ImportError as error:
        raise Skip(f"trl.kernels.chunked_divergence does not import ({error})")
    path = "Triton" if inputs.student_hidden.device.type in ("cuda", "xpu") else "PyTorch fallback"

    def loss():
        per_token, _entropy = chunked.ChunkedDivergenceFunction.apply(
            inputs.student_hidden, inputs.student_weight, None, inputs.teacher_hidden, inputs.teacher_weight, None,
            beta, inputs.temperature)
        return per_token.sum() / inputs.rows
    return loss, f"ChunkedDivergenceFunction, {path}, tiles {chunked.TOKEN_CHUNK_SIZE}x{chunked.VOCAB_CHUNK_SIZE}"


def _liger(inputs: Inputs, divergence: str, beta: float, options: dict):
    try:
        chunked_loss = importlib.import_module("liger_kernel.chunked_loss")
    except ImportError as error:
        raise Skip(f"liger_kernel.chunked_loss does not import ({error})")
    compiled = options["compile"] and (divergence == options["first_divergence"] or not options["quick"])
    module = chunked_loss.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                                  temperature=inputs.temperature, compiled=compiled,
                                                  chunk_size=LIGER_CHUNK)
    target = torch.zeros(inputs.rows, dtype=torch.long, device=inputs.student_hidden.device)
    if compiled:
        torch._dynamo.reset()

    def loss():
        return module(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden, inputs.teacher_weight,
                      target)
    loss.compiles = compiled
    return loss, f"LigerFusedLinearJSDLoss(beta={beta}), chunks of {LIGER_CHUNK}, " + \
        ("torch.compile" if compiled else "eager")


def _materialised(inputs: Inputs, beta: float) -> Callable[[], torch.Tensor]:
    def loss(hs, ws, ht, wt):
        with torch.no_grad():
            teacher_logits = ht @ wt.T
        return torch_divergence(hs @ ws.T, teacher_logits, beta, inputs.temperature)
    return loss


def _torch_compile(inputs: Inputs, divergence: str, beta: float, options: dict):
    if not options["compile"]:
        raise Skip("--no-compile")
    if options["quick"] and divergence != options["first_divergence"]:
        raise Skip("--quick compiles for the first divergence only")
    torch._dynamo.reset()
    compiled = torch.compile(_materialised(inputs, beta), dynamic=False)

    def loss():
        return compiled(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden, inputs.teacher_weight)
    loss.compiles = True
    return loss, "materialised logits, divergence in PyTorch, torch.compile"


def _torch_eager(inputs: Inputs, divergence: str, beta: float, options: dict):
    eager = _materialised(inputs, beta)

    def loss():
        return eager(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden, inputs.teacher_weight)
    return loss, "materialised logits, divergence in PyTorch"


def _linear_ce(inputs: Inputs, divergence: str, beta: float, options: dict):
    if divergence != "forward_kl":
        raise Skip("soft-target CE is the forward KL only")
    if not hasattr(F, "linear_cross_entropy"):
        raise Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    temperature = inputs.temperature
    chunked_options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
    # does the chunked path take probability targets in this torch? (2.13 falls back with a warning)
    probe_hidden = torch.randn(8, 4, device=inputs.student_hidden.device, dtype=inputs.student_hidden.dtype)
    probe_weight = torch.randn(16, 4, device=probe_hidden.device, dtype=probe_hidden.dtype)
    probe_target = torch.softmax(torch.randn(8, 16, device=probe_hidden.device, dtype=probe_hidden.dtype), -1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if chunked_options is not None:
            F.linear_cross_entropy(probe_hidden, probe_weight, probe_target, options=chunked_options)
    if chunked_options is not None and not any("ignored" in str(w.message) for w in caught):
        chosen, path = chunked_options, "chunked path (LinearCrossEntropyOptions())"
    else:
        chosen, path = None, "reference path (this torch's chunked path takes class-index targets only)"

    def loss():
        with torch.no_grad():
            teacher_probs = torch.softmax(inputs.teacher_logits() / temperature, dim=-1)
        student = inputs.student_hidden / temperature if temperature != 1.0 else inputs.student_hidden
        return F.linear_cross_entropy(student, inputs.student_weight, teacher_probs, options=chosen)
    return loss, f"soft targets = teacher softmax (in the step), {path}; loss = forward KL + H(teacher)"


def _topk_builder(k: int):
    def build(inputs: Inputs, divergence: str, beta: float, options: dict):
        loss_fn = getattr(kdfast, "fused_linear_topk_divergence_loss", None)
        if loss_fn is None:
            raise Skip("kdfast.fused_linear_topk_divergence_loss does not exist in this kdfast")
        if k > inputs.student_weight.shape[0]:
            raise Skip(f"k={k} > V")
        indices, logprobs = options["topk_teacher"](k)
        extra = dict(reverse_kl_floor=-100.0) if divergence == "reverse_kl" else {}
        backend = options["kdfast_backend"]

        def loss():
            return loss_fn(inputs.student_hidden, inputs.student_weight, indices, logprobs, divergence=divergence,
                           beta=beta, temperature=inputs.temperature, backend=backend, **extra)
        return loss, f"teacher top-{k} log-probs (precomputed), tail=renormalize" + \
            (", reverse_kl_floor=-100" if extra else "") + f", backend={backend}"
    return build


BUILDERS: dict[str, Callable] = {"gemm-floor": _gemm_floor, "kdfast": _kdfast, "trl": _trl, "liger": _liger,
                                 "torch-compile": _torch_compile, "torch-eager": _torch_eager,
                                 "linear-ce": _linear_ce}


# --------------------------------------------------------------------------- the run


@dataclass
class Row:
    divergence: str
    provider: str
    p50: Optional[float] = None
    p20: Optional[float] = None
    p80: Optional[float] = None
    extra_mib: Optional[float] = None
    first_call_s: Optional[float] = None
    note: str = ""
    status: str = "ok"               # ok | skipped | failed
    ratios: dict = field(default_factory=dict)


def _topk_cache(inputs: Inputs, largest: int):
    """The teacher's top-k log-probabilities at T, computed once (sorted, so smaller k are prefixes)."""
    cache = {}

    def get(k: int):
        if "all" not in cache:
            with torch.no_grad():
                logprobs = torch.log_softmax(inputs.teacher_logits().float() / inputs.temperature, dim=-1)
                values, indices = logprobs.topk(min(largest, logprobs.shape[-1]), dim=-1)
                cache["all"] = (indices, values.to(inputs.student_hidden.dtype))
                del logprobs
        indices, values = cache["all"]
        return indices[:, :k].contiguous(), values[:, :k].contiguous()
    return get


def measure(build, inputs: Inputs, divergence: str, beta: float, options: dict, device: torch.device,
            threads: int, min_run_time: float, memory: bool) -> Row:
    row = Row(divergence, "")
    try:
        fn, row.note = build(inputs, divergence, beta, options)
    except Skip as reason:
        row.status, row.note = "skipped", str(reason)
        return row
    is_loss = build is not _gemm_floor

    def step():
        if is_loss:
            fn().backward()
        else:
            fn()
    # A provider that compiles warms up unprofiled (the compiler's own allocations are not the
    # step's) and is profiled afterwards; the others are profiled in the warm-up itself (one step
    # less: at the full shape one step takes tens of seconds on 2 cores).
    profile_warm_up = memory and not getattr(fn, "compiles", False)
    try:
        with num_threads(threads):
            for tensor in inputs.trainable:
                tensor.grad = None
            started = time.perf_counter()
            if profile_warm_up:
                row.extra_mib = peak_step_bytes(step, device=device, live_bytes=0) / 2**20
            else:
                step()  # warm-up: compiles, first-use builds
            row.first_call_s = time.perf_counter() - started
        row.p50, row.p20, row.p80 = time_fn(step, device=device, threads=threads, min_run_time=min_run_time,
                                            grad_to_none=inputs.trainable)
        if memory and not profile_warm_up:
            for tensor in inputs.trainable:
                tensor.grad = None
            with num_threads(threads):
                row.extra_mib = peak_step_bytes(step, device=device, live_bytes=0) / 2**20
    except Exception as error:  # one broken provider must not lose the others' results
        row.status = "failed"
        row.note = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        traceback.print_exc()
    finally:
        for tensor in inputs.trainable:
            tensor.grad = None
    return row


def add_ratios(rows: list[Row]) -> None:
    for divergence in {row.divergence for row in rows}:
        chosen = [row for row in rows if row.divergence == divergence and row.status == "ok"]
        for base in ("gemm-floor", "kdfast"):
            reference = next((row.p50 for row in chosen if row.provider == base), None)
            for row in chosen:
                if reference:
                    row.ratios[base] = row.p50 / reference


def versions() -> dict:
    found = {"torch": torch.__version__, "kdfast": kdfast.__version__}
    for package, name in (("trl", "trl"), ("liger-kernel", "liger"), ("transformers", "transformers")):
        try:
            found[name] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["divergence", "provider", "full ms p50 [p20–p80]", "× GEMM floor", "× kdfast", "extra MiB",
              "1st call s", "note"]
    lines = []
    for row in rows:
        timing = "—" if row.p50 is None else f"{_fmt(row.p50)} [{_fmt(row.p20)}–{_fmt(row.p80)}]"
        note = row.note if row.status == "ok" else f"{row.status.upper()}: {row.note}"
        lines.append([row.divergence, row.provider, timing, _fmt(row.ratios.get("gemm-floor")),
                      _fmt(row.ratios.get("kdfast")), _fmt(row.extra_mib), _fmt(row.first_call_s), note])
    return header, lines


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"small shapes ({'x'.join(map(str, SHAPES['quick']))}): a smoke test of every provider; "
                             "torch.compile (torch-compile, Liger compiled) for the first divergence only")
    parser.add_argument("--shape", help="NxHxV (default: %s, or the --quick shape)" % "x".join(map(str, SHAPES["full"])))
    parser.add_argument("--teacher-hidden", type=int, help="the teacher's hidden size (default: H)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--divergences", nargs="+", choices=tuple(DIVERGENCES), default=tuple(DIVERGENCES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    parser.add_argument("--topk", nargs="+", type=int, default=TOPK, help="k values of kdfast-topk")
    parser.add_argument("--kdfast-backend", default="auto", help="backend= of the kdfast providers (default auto)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip torch-compile and run Liger's chunked loss eagerly (compiling costs seconds per case)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory step")
    parser.add_argument("--min-run-time", type=float,
                        help="seconds of timing per case, at least 3 samples (default 0.05 --quick, else 1)")
    parser.add_argument("--comment", help="a line added to the markdown file")
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--prefix", help="file-name prefix (default kdfast-llm, kdfast-llm-quick)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.lower().split("x")) if args.shape else \
        SHAPES["quick" if args.quick else "full"]
    rows_n, hidden, vocab = shape
    teacher_hidden = args.teacher_hidden or hidden
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 1.0)
    inputs = make_inputs(rows_n, hidden, vocab, teacher_hidden, dtype, device, args.temperature)
    topk = sorted(set(args.topk))
    options = dict(compile=args.compile, quick=args.quick, first_divergence=args.divergences[0],
                   kdfast_backend=args.kdfast_backend,
                   topk_teacher=_topk_cache(inputs, max(topk)) if topk else None)
    builders = []
    for provider in args.providers:
        if provider == "kdfast-topk":
            builders += [(f"kdfast-topk-k{k}", _topk_builder(k)) for k in topk]
        else:
            builders.append((provider, BUILDERS[provider]))
    started = time.perf_counter()
    rows: list[Row] = []
    for divergence in args.divergences:
        beta = DIVERGENCES[divergence]
        for name, build in builders:
            row = measure(build, inputs, divergence, beta, options, device, args.threads, min_run_time, args.memory)
            row.provider = name
            rows.append(row)
            print(f"{divergence:10s} {name:18s} " + (f"{row.p50:10.2f} ms  +{_fmt(row.extra_mib)} MiB"
                                                        if row.status == "ok" else f"{row.status}: {row.note}"),
                  flush=True)
    add_ratios(rows)
    seconds = time.perf_counter() - started
    found = versions()
    date = datetime.date.today().isoformat()
    prefix = args.prefix or ("kdfast-llm-quick" if args.quick and not args.shape else "kdfast-llm")
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{prefix}_{device_tag(device)}_{date}")
    header, lines = table(rows)
    describe = (f"N={rows_n} H={hidden}" + (f" (teacher H={teacher_hidden})" if teacher_hidden != hidden else "")
                + f" V={vocab}, {args.dtype}, T={args.temperature}, forward+backward, {args.threads} threads")
    about = (f"Device: {device_name(device)} · " + " · ".join(f"{k} {v}" for k, v in found.items())
             + f" · {date} · run took {seconds:.0f} s")
    with open(stem + ".csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["divergence", "provider", "status", "p50_ms", "p20_ms", "p80_ms", "x_gemm_floor",
                         "x_kdfast", "extra_MiB", "first_call_s", "N", "H", "H_teacher", "V", "dtype", "temperature",
                         "threads", "device", "torch", "kdfast", "trl", "liger", "date", "note"])
        for row in rows:
            writer.writerow([row.divergence, row.provider, row.status, row.p50, row.p20, row.p80,
                             row.ratios.get("gemm-floor"), row.ratios.get("kdfast"), row.extra_mib, row.first_call_s,
                             rows_n, hidden, teacher_hidden, vocab, args.dtype, args.temperature, args.threads,
                             device_tag(device), found["torch"], found["kdfast"], found["trl"], found["liger"], date,
                             row.note])
    with open(stem + ".md", "w") as handle:
        handle.write("\n".join([
            "# LLM distillation on output projections: kdfast, TRL, Liger, PyTorch", "",
            describe + ".", "", about + ".", "",
            "Every provider: student hidden [N, H] and LM head [V, H] with gradients, frozen teacher, one "
            "divergence of softmax(z/T), mean over rows, no T². Time: torch.utils.benchmark, median with "
            "20th–80th percentiles of forward+backward (`benchmarks.timing.time_fn`); extra MiB: peak bytes "
            "allocated during one step on top of the inputs (`benchmarks.memory.peak_step_bytes`: torch "
            "profiler memory events on CPU), the student's gradients included; 1st call: the warm-up step "
            "(compiles included; profiled, so the memory step, for the providers that do not compile). × GEMM floor / × kdfast: p50 over the p50 of `gemm-floor` / `kdfast` for "
            "the same divergence. `python -m benchmarks.llm --help` describes each provider.", "",
            *([f"**{args.comment}**", ""] if args.comment else []),
            markdown_table(header, lines), ""]))
    print()
    print(describe)
    print(about)
    print(text_table(header, [line[:-1] + [line[-1][:90]] for line in lines]))
    print(f"\nwrote {stem}.csv\n      {stem}.md")
    return dict(rows=rows, csv=stem + ".csv", markdown=stem + ".md", versions=found)


if __name__ == "__main__":
    main(sys.argv[1:])
