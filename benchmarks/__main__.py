"""``python -m benchmarks [--quick | --scaling] [options]``: the benchmark suite on the current device.

Writes ``benchmarks/results/<prefix>_<device>_<date>.{csv,md}`` and one PNG per family (or one
scaling PNG), and prints the table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import report
from .roofline import MODES
from .suite import FAMILIES, Config, device_tag, plan, run, run_scaling, too_big

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: per sweep: (compile policy, seconds of timing per case and mode)
SWEEP_DEFAULTS = {"tiny": ("none", 0.01), "quick": ("largest", 0.1), "targets": ("all", 0.5), "default": ("all", 0.5)}


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="sweep", const="quick",
                      help="few small shapes, torch.compile at the largest shape of each kernel only (< 3 min on 2 CPU cores)")
    size.add_argument("--targets", action="store_const", dest="sweep", const="targets",
                      help="only the shapes the project's issues set targets at (CPU: 4096x32000 logits, ND 512x2048, "
                           "KDA 1024x2048 m=100, fused-linear 4096x1024x32000; CUDA device: 8192x32000 and "
                           "8192x128256 logits, fused-linear 8192x4096x128256, ND and KDA as on CPU)")
    size.add_argument("--tiny", action="store_const", dest="sweep", const="tiny",
                      help="toy shapes that only exercise the machinery (the smoke test)")
    parser.add_argument("--scaling", action="store_true",
                        help="time of the row-softmax kernels against N and against V instead of the main sweep")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--families", nargs="+", choices=tuple(FAMILIES), default=tuple(FAMILIES))
    parser.add_argument("--kernels", nargs="+", choices=sorted({k.name for f in FAMILIES.values() for k in f.kernels}),
                        help="only these kernels (e.g. fused_linear_kd_loss; default: all)")
    parser.add_argument("--single-sample-after", type=float, default=120.0,
                        help="seconds: a forward+backward slower than this is measured once (default 120)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--compile", choices=("all", "largest", "none"),
                        help="which shapes get a torch.compile baseline (compiling costs 5–40 s per shape on CPU); "
                             "default: largest with --quick, none with --scaling, else all")
    parser.add_argument("--min-run-time", type=float, help="seconds of timing per case and mode (at least 3 samples)")
    parser.add_argument("--threads", type=int, help="torch threads for every shape (default: 1 for small shapes, all for large)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--time-limit", type=float,
                        help="seconds: skip the cases left once the run has taken this long, then write the results "
                             "as usual (torch.compile cases run last; scripts/gpu-check uses this)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--plan", action="store_true",
                        help="list the cases (and those skipped as too big for memory) without running them")
    parser.add_argument("--comment", help="a line added to the markdown file (e.g. 'provisional: busy machine')")
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--prefix", help="file-name prefix (default: kdfast, kdfast-quick, kdfast-scaling)")
    parser.set_defaults(sweep="default")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    compile_default, run_time_default = SWEEP_DEFAULTS[args.sweep]
    config = Config(sweep=args.sweep, device=torch.device(args.device), dtype=getattr(torch, args.dtype),
                    families=tuple(args.families), modes=tuple(args.modes),
                    compile=args.compile or ("none" if args.scaling else compile_default),
                    min_run_time=args.min_run_time if args.min_run_time is not None else run_time_default,
                    threads=args.threads, memory=not args.no_memory, single_sample_after=args.single_sample_after,
                    kernels=tuple(args.kernels) if args.kernels else None, time_limit=args.time_limit)
    if args.plan:
        notes: list = []
        for case in plan(config, notes):
            skip = too_big(case, config, {})
            print(f"{case.kernel.name:22s} {case.provider.name:14s} {case.family.describe(case.shape):24s} "
                  f"threads={case.threads}" + (f"  SKIP: {skip}" if skip else ""))
        for note in notes:
            print(f"note: {note}")
        return {}
    started = time.perf_counter()
    result = run_scaling(config) if args.scaling else run(config)
    prefix = args.prefix or "kdfast" + ("-scaling" if args.scaling else "") + \
        ("" if args.sweep == "default" else f"-{args.sweep}")
    csv_path, md_path, png_for = report.output_paths(args.out_dir, prefix, device_tag(config.device),
                                                     result.meta["date"])
    title = f"kdfast benchmarks ({'scaling, ' if args.scaling else ''}{args.sweep} sweep)"
    report.write_csv(result.rows, csv_path)
    if args.scaling:
        report.write_scaling_markdown(result, md_path, title, args.comment)
        header, lines = report.scaling_lines(result)
        pngs = [] if args.no_plots else [report.plot_scaling(result, png_for("scaling"))]
    else:
        report.write_markdown(result, md_path, title, args.comment)
        header, lines = report.summary_table(result)
        pngs = [] if args.no_plots else report.plot_families(result, png_for)
    print()
    print(report.text_table(header, lines))
    print("\ncopy bandwidth: " + ", ".join(f"{rate:.2f} GB/s ({threads} thr)" for threads, rate in result.bandwidth.items()))
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nwrote {csv_path}\n      {md_path}" + "".join(f"\n      {path}" for path in pngs))
    print(f"total {time.perf_counter() - started:.0f} s")
    return dict(result=result, csv=csv_path, markdown=md_path, plots=pngs)


if __name__ == "__main__":
    main(sys.argv[1:])
