"""``python -m benchmarks.ab --baseline DIR``: the CPU row kernels of this checkout against those of
another checkout (e.g. a ``git worktree`` of the previous commit with its extension built in place),
interleaved on the same machine, so a kernel change is judged by a before/after measured side by side.

Each round runs one subprocess per build (A = DIR, B = this checkout) in alternating order; each
subprocess times ``torch.ops.kdfast.row_softmax`` (the kernel alone: loss and gradient, no autograd)
for the KD and SKD rows of ``--targets``. Prints per-build medians and B/A ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name → row_softmax arguments after (student, teacher, target): normalize code, multiplier, eps,
#: temperature, teacher code, kl_weight, ce_weight, uniform_weight, reweight, alpha, eps, ignore_index
CASES = {
    "kd": (0, 1.0, 1e-7, 4.0, 1, 16.0, 0.0, 0.0, False, 0.0, 1e-6, -100),
    "skd": (1, 2.0, 1e-7, 4.0, 1, 16.0, 0.0, 0.0, False, 0.0, 1e-6, -100),
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import kdfast._C  # noqa: F401  (the build under test)
assert kdfast._C.__file__.startswith(sys.argv[1]), kdfast._C.__file__
rows, classes, repeats = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cases = json.loads(sys.argv[5])
g = torch.Generator().manual_seed(0)
s = torch.randn(rows, classes, generator=g) * 3
t = torch.randn(rows, classes, generator=g) * 3
out = {}
for name, args in cases.items():
    op = lambda: torch.ops.kdfast.row_softmax(s, t, None, *args)
    op()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss, grad = op()
        times.append(time.perf_counter() - start)
        del loss, grad
    out[name] = sorted(times)[len(times) // 2]
print(json.dumps(out))
"""


def run_build(root: str, rows: int, classes: int, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-c", CHILD, root, str(rows), str(classes), str(repeats),
                             json.dumps(CASES)], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the other checkout (its kdfast/_C*.so built in place)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per subprocess (the median is kept)")
    args = parser.parse_args(argv)
    builds = {"A": os.path.abspath(args.baseline), "B": HERE}
    samples: dict = {key: {name: [] for name in CASES} for key in builds}
    for round_index in range(args.rounds):
        order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
        for key in order:
            for name, seconds in run_build(builds[key], args.rows, args.classes, args.repeats).items():
                samples[key][name].append(seconds)
    import torch
    print(f"row_softmax kernel, {args.rows}x{args.classes} fp32, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds x {args.repeats} calls (medians of the per-round medians)")
    print(f"A = {builds['A']}\nB = {builds['B']}")
    for name in CASES:
        a = statistics.median(samples["A"][name]) * 1e3
        b = statistics.median(samples["B"][name]) * 1e3
        rounds_a = ", ".join(f"{x * 1e3:.0f}" for x in samples["A"][name])
        rounds_b = ", ".join(f"{x * 1e3:.0f}" for x in samples["B"][name])
        print(f"{name:4s} A {a:7.1f} ms [{rounds_a}]   B {b:7.1f} ms [{rounds_b}]   B/A {b / a:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
