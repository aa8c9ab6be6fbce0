"""``python -m benchmarks.evaluation``: what an evaluation loop pays, against a training forward.

For each loss and shape, side by side in one run: the forward of a training step (student with
``requires_grad``: the fused kernels compute the gradient during the forward) and the same call under
``torch.no_grad()`` (the loss only: no gradient pass, no [N, C] allocation), for each kdfast backend
that runs on the device and for the reference (eager PyTorch). Time: median with 20th–80th
percentiles; memory: peak bytes allocated during the call on top of the inputs (the profiler's
memory events on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

Writes ``benchmarks/results/kdfast-evaluation_<device>_<date>.{csv,md}``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys

import torch

import kdfast

from .memory import peak_step_bytes
from .suite import device_tag
from .timing import time_fn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: (loss, keyword options) timed
LOSSES = [("kd_loss", {}), ("skd_loss", {})]
SHAPES = {"cpu": [(1024, 8192), (4096, 32000)], "cuda": [(8192, 32000), (8192, 128256)]}


def measure(loss_name, options, backend, rows, classes, dtype, device, threads, min_run_time):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(rows, classes, generator=generator) * 3).to(device, dtype)
    teacher = (torch.randn(rows, classes, generator=generator) * 3).to(device, dtype)
    trainee = student.clone().requires_grad_()
    loss_fn = getattr(kdfast, loss_name)
    live = 2 * student.numel() * student.element_size()
    results = {}
    for mode in ("training forward", "no_grad"):
        if mode == "no_grad":
            def call():
                with torch.no_grad():
                    loss_fn(student, teacher, backend=backend, **options)
        else:
            def call():
                loss_fn(trainee, teacher, backend=backend, **options)
        call()
        p50, p20, p80 = time_fn(call, device=device, threads=threads, min_run_time=min_run_time)
        peak = peak_step_bytes(call, device=device, live_bytes=live)
        results[mode] = (p50, p20, p80, (peak - live) / 2**20)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--shapes", nargs="+", help="N×V shapes, e.g. 1024x8192 (default: per device)")
    parser.add_argument("--out-dir", default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else \
        SHAPES[device.type]
    backends = [name for name in kdfast.available_backends("kd_loss", device) if name != "reference"] + ["reference"]
    rows_out = []
    for loss_name, options in LOSSES:
        for rows, classes in shapes:
            for backend in backends:
                result = measure(loss_name, options, backend, rows, classes, dtype, device, threads,
                                 args.min_run_time)
                train, evaluation = result["training forward"], result["no_grad"]
                for mode, (p50, p20, p80, extra) in result.items():
                    rows_out.append(dict(loss=loss_name, N=rows, V=classes, dtype=args.dtype, backend=backend,
                                         mode=mode, p50_ms=round(p50, 3), p20_ms=round(p20, 3), p80_ms=round(p80, 3),
                                         extra_MiB=round(extra, 1), threads=threads, device=device_tag(device)))
                print(f"{loss_name} {rows}x{classes} {backend}: training forward {train[0]:.2f} ms "
                      f"(+{train[3]:.0f} MiB), no_grad {evaluation[0]:.2f} ms (+{evaluation[3]:.0f} MiB): "
                      f"{train[0] / evaluation[0]:.2f}x faster", flush=True)
    date = datetime.date.today().isoformat()
    stem = os.path.join(args.out_dir, f"kdfast-evaluation{'' if dtype == torch.float32 else '-' + args.dtype}"
                                      f"_{device_tag(device)}_{date}")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(stem + ".csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows_out[0]))
        writer.writeheader()
        writer.writerows(rows_out)
    with open(stem + ".md", "w") as handle:
        handle.write(f"# Evaluation (no_grad) against a training forward — {device_tag(device)}, {date}\n\n"
                     f"torch {torch.__version__}, {threads} threads, {args.dtype}; time p50 [p20–p80] ms; "
                     "memory: peak allocated on top of the inputs.\n\n"
                     "| loss | N×V | backend | training forward ms | MiB | no_grad ms | MiB | speed-up |\n"
                     "|---|---|---|---|---|---|---|---|\n")
        for index in range(0, len(rows_out), 2):
            train, evaluation = rows_out[index], rows_out[index + 1]
            handle.write(f"| {train['loss']} | {train['N']}×{train['V']} | {train['backend']} | "
                         f"{train['p50_ms']} [{train['p20_ms']}–{train['p80_ms']}] | {train['extra_MiB']} | "
                         f"{evaluation['p50_ms']} [{evaluation['p20_ms']}–{evaluation['p80_ms']}] | "
                         f"{evaluation['extra_MiB']} | {train['p50_ms'] / evaluation['p50_ms']:.2f}× |\n")
    print(f"wrote {stem}.csv\n      {stem}.md")


if __name__ == "__main__":
    main(sys.argv[1:])
