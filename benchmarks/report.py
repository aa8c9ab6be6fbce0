"""Writers: the printed table, the CSV, the markdown table for the README, and the PNG plots."""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict

from .suite import COLUMNS, FAMILIES, Result

METHOD = (
    "Timing: torch.utils.benchmark (CPU; blocked_autorange) or triton.testing.do_bench (CUDA), "
    "median with 20th–80th percentiles; backward alone is timed with the forward in untimed setup. "
    "Peak memory: one forward+backward, inputs included (CUDA: max_memory_allocated; CPU: peak of "
    "the running sum of torch.profiler memory events, plus the inputs). Bandwidth: the bytes the op "
    "must move at least (benchmarks.roofline.min_bytes) / p50 time, and its fraction of the copy "
    "bandwidth measured in the same run with the same thread count. Speed-up: p50 time of the "
    "fastest non-kdfast provider / p50 time of the kdfast backend (> 1: kdfast is faster); mem ratio: "
    "its peak / the leanest other provider's; extra MiB: the peak minus the inputs (what the loss "
    "itself costs), extra ratio: the same ratio on it. kdfast backends compute the gradient in the forward and "
    "their backward only rescales it, so compare them on full (forward+backward)."
)


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _pivot(rows: list[dict]) -> dict:
    """(family, kernel, shape, provider) → {(mode, metric): row}, in the order rows came."""
    table: dict = {}
    for row in rows:
        if row["family"] == "device":
            continue
        table.setdefault((row["family"], row["kernel"], row["shape"], row["provider"]), {})[
            (row["mode"], row["metric"])] = row
    return table


def summary_table(result: Result) -> tuple[list[str], list[list[str]]]:
    header = ["family", "kernel", "shape", "thr", "provider", "fwd ms", "bwd ms", "full ms [p20–p80]",
              "peak MiB", "extra MiB", "full GB/s", "% copy", "speed-up", "mem ratio", "extra ratio"]
    lines = []
    for (family, kernel, shape, provider), cells in _pivot(result.rows).items():
        def get(mode, metric, key="p50"):
            row = cells.get((mode, metric))
            return None if row is None else row[key]
        full = cells.get(("full", "time"))
        full_text = "—" if full is None else f"{_fmt(full['p50'])} [{_fmt(full['p20'])}–{_fmt(full['p80'])}]"
        fraction = get("full", "roofline_fraction")
        speedup = cells.get(("full", "speedup_vs_best_other"))
        threads = next(iter(cells.values()))["threads"]
        lines.append([family, kernel, shape, str(threads), provider, _fmt(get("forward", "time")),
                      _fmt(get("backward", "time")), full_text, _fmt(get("full", "memory")),
                      _fmt(get("full", "memory_extra")),
                      _fmt(get("full", "bandwidth")), "—" if fraction is None else f"{100 * fraction:.0f}%",
                      "—" if speedup is None else f"{speedup['p50']:.2f}× {speedup['note']}",
                      _fmt(get("full", "memory_vs_best_other")), _fmt(get("full", "memory_extra_vs_best_other"))])
    return header, lines


def text_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths))]
    out.append("  ".join("-" * width for width in widths))
    out += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
    return "\n".join(out)


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return "\n".join(out)


def _preamble(result: Result, title: str, comment: str | None = None) -> list[str]:
    meta = result.meta
    copy = ", ".join(f"{rate:.2f} GB/s with {threads} thread{'s' * (threads > 1)}"
                     for threads, rate in result.bandwidth.items())
    return [f"# {title}", "",
            f"Device: {meta['device']} · dtype {meta['dtype']} · torch {meta['torch_version']} · "
            f"kdfast {meta['kdfast_version']} · {meta['date']} · run took {result.seconds:.0f} s", "",
            f"Copy bandwidth: {copy}."] + _fresh_line(meta) + ["", METHOD, ""] + \
        ([f"**{comment}**", ""] if comment else [])


def _fresh_line(meta: dict) -> list[str]:
    fresh = meta.get("fresh_copy")
    if not fresh:
        return []
    rates = ", ".join(f"{rate:.2f} GB/s with {threads} thread{'s' * (threads > 1)}" for threads, rate in fresh.items())
    return ["", f"Copy into freshly allocated memory (`clone()`, page faults included): {rates}. Every op that "
                "returns a new tensor — a gradient — pays this; it is the practical ceiling of the '% copy' column."]


def write_markdown(result: Result, path: str, title: str, comment: str | None = None) -> None:
    header, lines = summary_table(result)
    text = _preamble(result, title, comment)
    for family in FAMILIES:
        chosen = [line[1:] for line in lines if line[0] == family]
        if chosen:
            text += [f"## {family}", "", markdown_table(header[1:], chosen), ""]
    if result.notes:
        text += ["## Notes", ""] + [f"- {note}" for note in result.notes] + [""]
    with open(path, "w") as handle:
        handle.write("\n".join(text))


def _series(rows, family, kernel, metric, mode):
    """provider → sorted [(x, p50, p20, p80)]"""
    out = defaultdict(list)
    for row in rows:
        if (row["family"], row["kernel"], row["metric"], row["mode"]) == (family, kernel, metric, mode):
            out[row["provider"]].append((row["x_value"], row["p50"], row["p20"], row["p80"]))
    return {provider: sorted(points) for provider, points in out.items()}


def _plot_lines(axis, series, ylabel, title, xlabel):
    for provider, points in series.items():
        x, p50, p20, p80 = (list(column) for column in zip(*points))
        errors = [[max(a - b, 0) for a, b in zip(p50, p20)], [max(b - a, 0) for a, b in zip(p50, p80)]]
        axis.errorbar(x, p50, yerr=errors, marker="o", capsize=3, label=provider)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)


def plot_families(result: Result, path_for) -> list[str]:
    """One PNG per family: full forward+backward time and peak memory against size, per kernel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for family_name, family in FAMILIES.items():
        kernels = [k.name for k in family.kernels if any(r["kernel"] == k.name for r in result.rows)]
        if not kernels:
            continue
        figure, axes = plt.subplots(len(kernels), 2, figsize=(11, 4 * len(kernels)), squeeze=False)
        for axis_row, kernel in zip(axes, kernels):
            _plot_lines(axis_row[0], _series(result.rows, family_name, kernel, "time", "full"), "ms (p50, p20–p80)",
                        f"{kernel}: forward+backward time", family.x_name)
            _plot_lines(axis_row[1], _series(result.rows, family_name, kernel, "memory", "full"), "MiB",
                        f"{kernel}: peak memory", family.x_name)
        figure.suptitle(f"{family_name} · {result.meta['device']} · {result.meta['dtype']} · {result.meta['date']}",
                        fontsize=10)
        figure.tight_layout()
        path = path_for(family_name)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def scaling_lines(result: Result) -> tuple[list[str], list[list[str]]]:
    """Per kernel, provider and sweep: ns per logit at each size and the log-log slope of time
    between neighbouring sizes (1.0 = linear)."""
    header = ["kernel", "provider", "sweep", "size", "full ms", "ns/logit", "slope"]
    lines = []
    groups = defaultdict(list)
    for row in result.rows:
        if row["metric"] in ("time", "ns_per_element"):
            groups[(row["kernel"], row["provider"], row["x_name"])].append(row)
    for (kernel, provider, sweep), group in groups.items():
        times = sorted((r["x_value"], r["p50"]) for r in group if r["metric"] == "time")
        per = {r["x_value"]: r["p50"] for r in group if r["metric"] == "ns_per_element"}
        previous = None
        for x, t in times:
            slope = "—" if previous is None else f"{math.log(t / previous[1]) / math.log(x / previous[0]):.2f}"
            lines.append([kernel, provider, sweep, str(x), _fmt(t), _fmt(per.get(x)), slope])
            previous = (x, t)
    return header, lines


def write_scaling_markdown(result: Result, path: str, title: str, comment: str | None = None) -> None:
    header, lines = scaling_lines(result)
    text = _preamble(result, title, comment) + [
        "Full forward+backward at a fixed thread count. Linear growth keeps ns/logit flat and the slope "
        "near 1; a step in ns/logit marks a change of path (cache or block limits, a backend switching "
        "kernels).", "", markdown_table(header, lines), ""]
    if result.notes:
        text += ["## Notes", ""] + [f"- {note}" for note in result.notes] + [""]
    with open(path, "w") as handle:
        handle.write("\n".join(text))


def plot_scaling(result: Result, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sweeps = sorted({row["x_name"] for row in result.rows})
    figure, axes = plt.subplots(1, max(len(sweeps), 1), figsize=(6 * max(len(sweeps), 1), 4.5), squeeze=False)
    for axis, sweep in zip(axes[0], sweeps):
        series = defaultdict(list)
        for row in result.rows:
            if row["x_name"] == sweep and row["metric"] == "ns_per_element":
                series[f"{row['kernel']} · {row['provider']}"].append(
                    (row["x_value"], row["p50"], row["p20"], row["p80"]))
        _plot_lines(axis, {key: sorted(points) for key, points in series.items()}, "ns per logit (p50, p20–p80)",
                    f"forward+backward vs {sweep}", sweep)
    figure.suptitle(f"scaling · {result.meta['device']} · {result.meta['dtype']} · {result.meta['date']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def output_paths(out_dir: str, prefix: str, tag: str, date: str):
    """(csv, markdown, png-for-family function); names carry device and date."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{prefix}_{tag}_{date}")
    return f"{stem}.csv", f"{stem}.md", lambda family: f"{stem}_{family}.png"
