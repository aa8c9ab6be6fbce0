"""The run loop: plan the cases (family × kernel × shape × provider), run each in every mode,
and turn the measurements into result rows (one row per kernel, provider, mode and metric)."""
from __future__ import annotations

import datetime
import math
import platform
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

import kdfast

from . import feature_centre, fused_linear, landmark_gram, rowsoftmax
from .family import Family, Kernel
from .memory import available_bytes, peak_step_bytes
from .providers import Provider, providers_for
from .roofline import MODES, copy_bandwidth, fresh_copy_bandwidth, min_bytes
from .timing import num_threads, threads_for, time_backward, time_fn

FAMILIES: dict[str, Family] = {family.name: family for family in
                               (rowsoftmax.FAMILY, feature_centre.FAMILY, landmark_gram.FAMILY,
                                fused_linear.FAMILY)}

COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80", "dtype",
           "device", "threads", "kdfast_version", "torch_version", "date", "family", "shape", "note")

#: share of the device's free memory a case may be estimated to need before it is skipped
MEMORY_HEADROOM = 0.8
#: bytes of the tensor copied to measure the copy bandwidth, per sweep
COPY_BYTES = {"tiny": 16 << 20, "quick": 256 << 20, "targets": 1 << 30, "default": 1 << 30}


@dataclass
class Config:
    sweep: str = "quick"                       # "tiny" | "quick" | "default"
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dtype: torch.dtype = torch.float32
    families: tuple[str, ...] = tuple(FAMILIES)
    modes: tuple[str, ...] = MODES
    compile: str = "all"                       # "all" | "largest" (one shape per kernel) | "none"
    min_run_time: float = 0.2                  # seconds of timing per (case, mode), at least 3 samples
    threads: Optional[int] = None              # None: 1 thread for small shapes, all cores otherwise
    memory: bool = True
    #: a step slower than this (seconds) is measured once, not repeated: see ``run_case``
    single_sample_after: float = 120.0
    #: kernels to run (by name); None: every kernel of the chosen families
    kernels: Optional[tuple[str, ...]] = None
    #: more providers per kernel (e.g. a stand-in fused backend in the smoke test)
    extra_providers: Optional[Callable[[Kernel, torch.device], list[Provider]]] = None
    progress: bool = True
    #: seconds: once the run has taken this long, the remaining cases are skipped (with a note) and
    #: the results so far are written; torch.compile cases then run after all others. None: no limit
    time_limit: Optional[float] = None


@dataclass(frozen=True)
class Case:
    family: Family
    kernel: Kernel
    shape: dict
    provider: Provider
    threads: int


@dataclass
class Result:
    rows: list[dict]
    notes: list[str]
    bandwidth: dict                            # threads → copy GB/s
    meta: dict
    seconds: float = 0.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """A short file-name-safe label: e.g. cpu-2t, nvidia-h100-80gb-hbm3."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return f"cpu-{torch.get_num_threads()}t"


def metadata(config: Config) -> dict:
    return dict(dtype=str(config.dtype).replace("torch.", ""), device=device_name(config.device),
                kdfast_version=kdfast.__version__, torch_version=torch.__version__,
                date=datetime.date.today().isoformat())


#: seconds a torch.compile case may need (its compile) that a time-limited run keeps in hand
COMPILE_ALLOWANCE = 45.0


def sweep_sizes(family: Family, config: Config) -> list[tuple]:
    """The family's shapes for the sweep: ``<sweep>-gpu`` on a CUDA device where the family has
    such a list (``--targets`` on a GPU: the issue-13 GPU target shapes), else ``<sweep>``."""
    gpu_key = f"{config.sweep}-gpu"
    if config.device.type == "cuda" and gpu_key in family.sizes:
        return family.sizes[gpu_key]
    return family.sizes[config.sweep]


def plan(config: Config, notes: list[str]) -> list[Case]:
    cases = []
    for family_name in config.families:
        family = FAMILIES[family_name]
        shapes = [family.shape(values) for values in sweep_sizes(family, config)]
        for kernel in family.kernels:
            if config.kernels is not None and kernel.name not in config.kernels:
                continue
            providers = providers_for(kernel, config.device, compile_=config.compile != "none", notes=notes)
            if config.extra_providers is not None:
                providers += config.extra_providers(kernel, config.device)
            for index, shape in enumerate(shapes):
                threads = threads_for(family.work(shape), family.small_work, config.threads)
                for provider in providers:
                    if provider.kind == "compile" and config.compile == "largest" and index != len(shapes) - 1:
                        continue
                    cases.append(Case(family, kernel, shape, provider, threads))
    return cases


def _row(meta: dict, case: Case, mode: str, metric: str, unit: str, values, note: str = "") -> dict:
    p50, p20, p80 = values
    return dict(kernel=case.kernel.name, provider=case.provider.name, mode=mode, metric=metric, unit=unit,
                x_name=case.family.x_name, x_value=case.family.x_value(case.shape), p50=p50, p20=p20, p80=p80,
                threads=case.threads, family=case.family.name, shape=case.family.describe(case.shape), note=note,
                **meta)


def too_big(case: Case, config: Config, learned: dict) -> str:
    """Why the case would not fit in the device's free memory, or "". The estimate is a multiple
    of the family's main tensor bytes: the ratio measured for this kernel and provider at a smaller
    shape (plus 10%) once there is one, a conservative static factor before that."""
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    factor = learned.get((case.kernel.name, case.provider.name),
                         case.family.factor(case.provider.kind, case.kernel.name))
    need = factor * case.family.unit_bytes(case.shape, itemsize)
    free = available_bytes(config.device)
    if need > MEMORY_HEADROOM * free:
        return f"needs ≈{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return ""


def _memory_rows(meta: dict, case: Case, peak: int, live: int) -> list[dict]:
    return [_row(meta, case, "full", "memory", "MiB", (peak / 2**20,) * 3,
                 "peak allocated during forward+backward, inputs included"),
            _row(meta, case, "full", "memory_extra", "MiB", ((peak - live) / 2**20,) * 3,
                 "peak allocated during forward+backward on top of the inputs")]


def run_case(case: Case, config: Config, meta: dict, bandwidth: dict, learned: dict, notes: list[str],
             modes: tuple[str, ...], memory: bool) -> list[dict]:
    """Every mode of one case; [] with a note when it is estimated not to fit or it fails."""
    family, kernel, shape, provider = case.family, case.kernel, case.shape, case.provider
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    unit = family.unit_bytes(shape, itemsize)
    key = (kernel.name, provider.name)
    label = f"{kernel.name} {provider.name} {family.describe(shape)}"
    reason = too_big(case, config, learned)
    if reason:
        notes.append(f"{label}: skipped, {reason}")
        return []
    rows = []
    try:
        with num_threads(case.threads):
            inputs, differentiable = family.make_inputs(shape, config.dtype, config.device)
            loss = provider.build()

            def forward():
                return loss(*inputs)

            def full():
                forward().backward()

            def clear():
                for tensor in differentiable:
                    tensor.grad = None

            live = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))

            def timed_step(profile: bool):
                """(seconds, peak bytes or None) of one forward+backward, under the profiler when
                ``profile`` (its cost, microseconds per op, is nothing next to a slow step)."""
                clear()
                # memory a provider keeps between steps (e.g. reused gradient blocks) is no event of this step
                held = provider.held_bytes() if profile and provider.held_bytes else 0
                started = time.perf_counter()
                peak = held + peak_step_bytes(full, device=config.device, live_bytes=live) if profile else full()
                return time.perf_counter() - started, peak

            # first call: compiles where the provider compiles (then it is no measurement)
            compiles = provider.kind == "compile"
            first_call, first_peak = timed_step(profile=memory and not compiles)
            if compiles:
                rows.append(_row(meta, case, "full", "compile_time", "s", (first_call,) * 3,
                                 "first forward+backward, compile included"))
            if first_call > config.single_sample_after:
                # minutes per step (e.g. bf16 matmuls without bf16 instructions on CPU): one timed,
                # profiled step is the measurement; the first one when nothing was compiled in it
                seconds, peak = timed_step(profile=memory) if compiles else (first_call, first_peak)
                note = f"one sample: a step takes {seconds:.0f} s" + ("" if compiles else " (the first call)")
                notes.append(f"{label}: {note}; only forward+backward timed")
                rows.append(_row(meta, case, "full", "time", "ms", (seconds * 1e3,) * 3, note))
                if memory:
                    rows.extend(_memory_rows(meta, case, peak, live))
                    learned[key] = 1.1 * peak / unit
                return rows
            clear()
            full()
            timing = dict(device=config.device, threads=case.threads, min_run_time=config.min_run_time)
            for mode in modes:
                if mode == "forward":
                    times = time_fn(forward, **timing)
                elif mode == "backward":
                    times = time_backward(forward, grad_to_none=differentiable, **timing)
                else:
                    times = time_fn(full, grad_to_none=differentiable, **timing)
                rows.append(_row(meta, case, mode, "time", "ms", times))
                moved = min_bytes(family.name, mode, shape, itemsize)
                if moved is not None:
                    # the 20th percentile of bandwidth comes from the 80th of time, and vice versa
                    rates = tuple(moved / (t * 1e-3) / 1e9 for t in (times[0], times[2], times[1]))
                    rows.append(_row(meta, case, mode, "bandwidth", "GB/s", rates, f"{moved} bytes moved at least"))
                    copy = bandwidth[case.threads]
                    rows.append(_row(meta, case, mode, "roofline_fraction", "fraction",
                                     tuple(rate / copy for rate in rates), f"copy bandwidth {copy:.2f} GB/s"))
            if memory:
                _, peak = timed_step(profile=True)
                rows.extend(_memory_rows(meta, case, peak, live))
                learned[key] = 1.1 * peak / unit
    except Exception as error:  # one failing provider must not end the run: note it and go on
        if config.device.type == "cuda":
            torch.cuda.empty_cache()
        notes.append(f"{label}: failed, {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        if not isinstance(error, (torch.OutOfMemoryError, MemoryError)):
            notes.append("".join(traceback.format_exception_only(error)).strip()[:500])
        return []
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """For every fused provider, per kernel, shape and mode: speed-up over the fastest other
    provider (its p50 time / the fused p50 time; > 1 means fused is faster) and its peak memory as
    a fraction of the leanest other provider's."""
    ratios = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["metric"] in ("time", "memory", "memory_extra"):
            groups.setdefault((row["kernel"], row["shape"], row["mode"], row["metric"]), []).append(row)
    for (_, _, _, metric), group in groups.items():
        others = [row for row in group if not row["provider"].startswith("kdfast-")]
        if not others:
            continue
        best = min(others, key=lambda row: row["p50"])
        for row in group:
            if not row["provider"].startswith("kdfast-"):
                continue
            value = best["p50"] / row["p50"] if metric == "time" else row["p50"] / max(best["p50"], 1e-12)
            ratios.append({**row, "metric": "speedup_vs_best_other" if metric == "time" else f"{metric}_vs_best_other",
                           "unit": "x" if metric == "time" else "fraction", "p50": value, "p20": math.nan,
                           "p80": math.nan, "note": f"vs {best['provider']}"})
    return rows + ratios


def _copy_run_time(config: Config) -> float:
    """Seconds of timing per copy-bandwidth measurement (at least 0.3 s outside the smoke test)."""
    return config.min_run_time if config.sweep == "tiny" else max(config.min_run_time, 0.3)


def measure_bandwidth(config: Config, thread_counts) -> dict:
    size = COPY_BYTES[config.sweep]
    return {threads: copy_bandwidth(config.device, size, threads, _copy_run_time(config))
            for threads in sorted(set(thread_counts))}


def run(config: Config) -> Result:
    started = time.perf_counter()
    notes: list[str] = []
    meta = metadata(config)
    cases = plan(config, notes)
    order = list(range(len(cases)))
    if config.time_limit is not None:
        # the compile baselines cost most before their first number: they run last (their rows
        # keep their place in the results)
        order.sort(key=lambda index: cases[index].provider.kind == "compile")
    bandwidth = measure_bandwidth(config, [case.threads for case in cases])
    case_rows: dict[int, list[dict]] = {}
    learned: dict = {}
    bar = tqdm(order, desc="benchmarks", unit="case", disable=not config.progress, dynamic_ncols=True)
    for index in bar:
        case = cases[index]
        bar.set_postfix_str(f"{case.kernel.name} {case.provider.name} {case.family.describe(case.shape)}")
        if config.time_limit is not None:
            left = config.time_limit - (time.perf_counter() - started)
            if left <= (COMPILE_ALLOWANCE if case.provider.kind == "compile" else 0.0):
                notes.append(f"{case.kernel.name} {case.provider.name} {case.family.describe(case.shape)}: "
                             f"skipped, time limit ({config.time_limit:.0f} s, {max(left, 0):.0f} s left)")
                continue
        case_rows[index] = run_case(case, config, meta, bandwidth, learned, notes, config.modes, config.memory)
    rows: list[dict] = [row for index in sorted(case_rows) for row in case_rows[index]]
    fresh = {threads: fresh_copy_bandwidth(config.device, COPY_BYTES[config.sweep], threads, _copy_run_time(config))
             for threads in bandwidth}
    row_meta = dict(meta)  # before fresh_copy is added: rows hold scalars only
    for kernel, rates, how in (("copy", bandwidth, "dst.copy_(src)"), ("clone", fresh, "src.clone(), fresh memory")):
        for threads, rate in rates.items():
            rows.append(dict(kernel=kernel, provider="torch", mode="copy", metric="bandwidth", unit="GB/s",
                             x_name="bytes", x_value=COPY_BYTES[config.sweep], p50=rate, p20=math.nan,
                             p80=math.nan, threads=threads, family="device", shape=f"bytes={COPY_BYTES[config.sweep]}",
                             note=f"{how}: (read + write) / p50 time", **row_meta))
    meta["fresh_copy"] = fresh
    return Result(add_ratios(rows), notes, bandwidth, meta, time.perf_counter() - started)


def run_scaling(config: Config) -> Result:
    """How the full forward+backward time of the row-softmax kernels grows with N (V fixed) and
    with V (N fixed), at one thread count, so that only the size changes; ns per logit stays flat
    when time is linear, and a step in it marks a change of path (e.g. a row no longer fitting a
    cache or a block, or a backend switching kernels)."""
    started = time.perf_counter()
    notes: list[str] = []
    meta = metadata(config)
    family = FAMILIES["row-softmax"]
    threads = config.threads or torch.get_num_threads()
    cases = []
    for kernel in family.kernels:
        providers = providers_for(kernel, config.device, compile_=config.compile == "all", notes=notes)
        if config.extra_providers is not None:
            providers += config.extra_providers(kernel, config.device)
        for dim, values, fixed in family.scaling[config.sweep]:
            held = " ".join(f"{key}={value}" for key, value in fixed.items())
            swept = replace(family, x_name=f"{dim} ({held})", x_value=lambda shape, dim=dim: shape[dim])
            for value in values:
                shape = {name: ({dim: value, **fixed})[name] for name in family.dims}
                cases.extend(Case(swept, kernel, shape, provider, threads) for provider in providers)
    bandwidth = measure_bandwidth(config, [threads])
    rows: list[dict] = []
    learned: dict = {}
    bar = tqdm(cases, desc="scaling", unit="case", disable=not config.progress, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(f"{case.kernel.name} {case.provider.name} {case.family.describe(case.shape)}")
        for row in run_case(case, config, meta, bandwidth, learned, notes, ("full",), memory=False):
            rows.append(row)
            if row["metric"] == "time":
                elements = case.shape["N"] * case.shape["V"]
                rows.append({**row, "metric": "ns_per_element", "unit": "ns",
                             **{key: row[key] * 1e6 / elements for key in ("p50", "p20", "p80")}})
    return Result(rows, notes, bandwidth, meta, time.perf_counter() - started)
