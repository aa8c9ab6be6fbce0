#!/usr/bin/env python3
"""One-command GPU check of kdfast (issue 13, item 7): ``bash scripts/gpu-check``.

On a machine with a CUDA GPU (made for the lent H100/H200 machine: torch 2.11+cu130, Triton 3.6,
nvcc 13.0, 16 cores, no network), in a copy of the repository, within one time budget (default
560 s, so that the device tool's 600 s per command holds):

1. probe   — GPU name, compute capability, driver, torch / CUDA / Triton / Python / nvcc versions,
             which pytest plugins and Liger-Kernel are importable.
2. wheels  — only when ``.whl/`` holds wheels (carried with the device tool): installed offline
             into a private folder put on PYTHONPATH (e.g. Liger-Kernel, which the image lacks).
3. build   — ``python setup.py build_ext --inplace`` with MAX_JOBS = all cores: ``kdfast._C`` and,
             when nvcc is found, ``kdfast._C_cuda``; then an import check of every backend. If
             setup.py fails without a compile error (say, an old setuptools) ``kdfast._C_cuda`` is
             built with ``torch.utils.cpp_extension.load`` instead. No nvcc: recorded, Triton only.
4. tests   — the whole suite restricted to the triton and cuda backends (``pytest -k``), with
             pytest-xdist and pytest-timeout when installed; every test outcome is streamed to a
             file as it happens (this module is also the pytest plugin), so a run stopped at its
             budget still counts what it ran. Counts per backend: passed, failed, skipped, not run.
5. bench   — ``python -m benchmarks --targets --device cuda``: the GPU target shapes (row-softmax
             KD/SKD 8192x32000 and 8192x128256 bf16; fused-linear 8192x4096x128256 bf16; ND
             512x2048 and KDA 1024x2048 m=100 in fp32), providers eager, torch.compile, every kdfast
             GPU backend, Liger-Kernel if importable; each run with its own time limit.
6. record  — ``kdfast.verified.record_run(...)`` once per backend (triton, cuda); if that function
             is missing or refuses the call, the records go to ``verified-runs.json`` (JSON lines)
             only. Either way ``verified-runs.json`` holds them, to be replayed where the results
             are committed (``--unpack``).
7. outputs — under $OUT (what the device tool brings back; at most 8 files, flat):
             gpu-check-summary.md, gpu-check-summary.json, gpu-check.log, verified-runs.json,
             pytest-junit.xml, gpu-check-results.tar.gz (benchmarks/results/* files and every log);
             and in the tree: benchmarks/results/kdfast-gpu-targets-*_<gpu>_<date>.{csv,md,png} and
             benchmarks/results/gpu-check_<gpu>_<date>.{md,json}.

Every step's failure or timeout is recorded and the next step still runs; the summary is always
written. Exit status: 0 when every step ran and no test failed, 1 otherwise, 2 for bad arguments.

Other modes:
  --dry-run         print the plan (commands, shapes, budgets, outputs) and exit; needs no GPU,
                    no torch (tests/test_gpu_check.py runs it on CPU).
  --fake            a rehearsal on a CPU machine: the same steps and control flow, with a CPU
                    build, a handful of interpreter tests and the ``--tiny`` benchmark on CPU;
                    results go to build/gpu-check/ (never to benchmarks/results/).
  --unpack DIR      here, after a device run: copy the benchmarks/results/ files out of
                    DIR/gpu-check-results.tar.gz into the tree and replay DIR/verified-runs.json
                    through kdfast.verified.record_run (DIR: the device tool's files_at).

This file is stdlib-only at import: the orchestrator never imports torch (a CUDA failure in a
step cannot take the summary down with it).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
WORK = os.path.join(ROOT, "build", "gpu-check")           # logs and scratch (build/ is git-ignored)
RESULTS = os.path.join(ROOT, "benchmarks", "results")

#: the device tool allows 600 s per command; the default leaves 40 s for start-up of python and slack
DEFAULT_BUDGET = 560.0
#: per step: the most it may take (seconds)
STEP_MAX = {"probe": 60.0, "wheels": 30.0, "build": 240.0, "tests": 200.0, "bench": 300.0}
#: what a later step needs at least to be worth running: held back from the steps before it
STEP_RESERVE = {"tests": 60.0, "bench": 60.0, "finish": 15.0}
#: below this a step is not started (recorded as skipped)
MIN_STEP = 15.0

#: the backends the GPU check verifies, and the pytest backend ids (tests/backends.py) counted for each
VERIFIED_BACKENDS = {"triton": ("triton", "triton-streamed"), "cuda": ("cuda",)}
BACKEND_IDS = ("triton-streamed", "triton", "cuda", "cpu", "reference")
#: tests of the two backends selected by name; the compile-only checks that CI already runs on CPU
#: (nvcc / Triton AOT) are left out on the device to keep the budget for running kernels
TESTS_K = "(triton or cuda) and not test_triton_aot and not test_cuda_sources"
#: per-test limit (pytest-timeout), seconds
TEST_TIMEOUT = 120
#: seconds between SIGINT (pytest writes its reports) and SIGTERM when a step runs out of time
INTERRUPT_GRACE = 20.0

#: the benchmark runs, most valuable first: (name, families, dtype, compile policy, most seconds)
#: shapes: benchmarks/<family>.py ``sizes["targets-gpu"]`` (``--targets`` on a CUDA device)
BENCH_RUNS = (
    ("rows-bf16", ("row-softmax",), "bfloat16", "largest", 170.0),
    ("fused-linear-bf16", ("fused-linear",), "bfloat16", "largest", 100.0),
    ("features-fp32", ("feature-centre", "landmark-gram"), "float32", "all", 80.0),
)
#: a benchmark run that gets less than this skips its torch.compile baseline
BENCH_COMPILE_MIN = 75.0
#: seconds a benchmark process needs beyond its cases (import, copy bandwidth, writing, plots)
BENCH_OVERHEAD = 30.0
BENCH_MIN_RUN_TIME = 0.1
#: the GPU target shapes, as stated in issue 13 (tests/test_gpu_check.py holds the benchmark
#: families' "targets-gpu" sizes to this table)
GPU_TARGETS = {
    "row-softmax": [{"N": 8192, "V": 32000}, {"N": 8192, "V": 128256}],
    "fused-linear": [{"N": 8192, "H": 4096, "V": 128256}],
    "feature-centre": [{"B": 512, "d": 2048, "C": 1000}],
    "landmark-gram": [{"B": 1024, "d": 2048, "m": 100}],
}
BENCH_KERNELS = {
    "row-softmax": "kd_loss (T=4), skd_loss[layernorm]",
    "fused-linear": "fused_linear_kd_loss, fused_linear_skd_loss",
    "feature-centre": "nd_loss",
    "landmark-gram": "nystrom_loss (KDA)",
}
OUT_FILES = ("gpu-check-summary.md", "gpu-check-summary.json", "gpu-check.log", "verified-runs.json",
             "pytest-junit.xml", "gpu-check-results.tar.gz")
TARBALL = "gpu-check-results.tar.gz"

# --------------------------------------------------------------------------------------------
# pytest plugin: ``-p gpu_check`` (scripts/ on PYTHONPATH). Streams every collected test id and
# every test report to $GPU_CHECK_EVENTS as JSON lines, from the controlling process only (under
# pytest-xdist the workers' reports reach the controller's hook too).
# --------------------------------------------------------------------------------------------

_EVENTS_ENV = "GPU_CHECK_EVENTS"
_collected_once = False


def _emit(config, record: dict) -> None:
    path = os.environ.get(_EVENTS_ENV)
    if not path or hasattr(config, "workerinput"):
        return
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def pytest_collection_finish(session):
    global _collected_once
    if not _collected_once:
        _collected_once = True
        _emit(session.config, {"event": "collected", "nodeids": [item.nodeid for item in session.items]})


def pytest_runtest_logreport(report):
    record = {"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
              "duration": round(getattr(report, "duration", 0.0), 4)}
    if report.failed:
        record["message"] = str(report.longrepr)[-1500:]
    _emit(_CONFIG.get("config"), record)


_CONFIG: dict = {}


def pytest_configure(config):
    _CONFIG["config"] = config
    # the xdist hook exists only where pytest-xdist is installed
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "gpu_check_xdist")


class _XdistHooks:
    def pytest_xdist_node_collection_finished(self, node, ids):
        global _collected_once
        if not _collected_once:
            _collected_once = True
            _emit(_CONFIG.get("config"), {"event": "collected", "nodeids": list(ids)})


# --------------------------------------------------------------------------------------------
# test outcomes
# --------------------------------------------------------------------------------------------


def backend_of(nodeid: str) -> str:
    """The backend a test id belongs to: its parameter id names it (tests/backends.py ids, e.g.
    ``test_dtypes[triton-float32-none]``); else a test named after triton or cuda; else "other"."""
    match = re.search(r"\[(.*)\]$", nodeid)
    if match:
        tokens = match.group(1).split("-")
        for preferred in (("triton", "cuda"), ("cpu", "reference")):
            for index, token in enumerate(tokens):
                if token in preferred:
                    if token == "triton" and tokens[index + 1:index + 2] == ["streamed"]:
                        return "triton-streamed"
                    return token
    name = nodeid.split("[", 1)[0].lower()
    if "triton" in name:
        return "triton"
    if "cuda" in name:
        return "cuda"
    return "other"


def read_events(path: str) -> tuple[Optional[list], dict, dict]:
    """(collected node ids or None, nodeid → outcome, nodeid → failure message) from the events file."""
    collected: Optional[list] = None
    outcome: dict = {}
    messages: dict = {}
    if not os.path.exists(path):
        return collected, outcome, messages
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by a kill
            if record.get("event") == "collected":
                collected = collected or record["nodeids"]
                continue
            nodeid, when, result = record.get("nodeid"), record.get("when"), record.get("outcome")
            if result == "failed":
                outcome[nodeid] = "failed" if when == "call" else "error"
                messages.setdefault(nodeid, record.get("message", ""))
            elif outcome.get(nodeid) in ("failed", "error"):
                continue
            elif result == "skipped":
                outcome[nodeid] = "skipped"
            elif result == "passed" and when == "call":
                outcome[nodeid] = "passed"
            elif result == "passed" and when == "setup":
                outcome.setdefault(nodeid, "running")
    # a test whose setup passed but whose call never reported was cut off
    outcome = {nodeid: value for nodeid, value in outcome.items() if value != "running"}
    return collected, outcome, messages


def count_by_backend(collected: Optional[list], outcome: dict) -> dict:
    """backend id → {passed, failed, errors, skipped, not_run, total}."""
    counts: dict = {}
    every = list(collected or []) + [nodeid for nodeid in outcome if collected is None or nodeid not in collected]
    for nodeid in dict.fromkeys(every):
        row = counts.setdefault(backend_of(nodeid), dict(passed=0, failed=0, errors=0, skipped=0, not_run=0, total=0))
        row["total"] += 1
        result = outcome.get(nodeid)
        key = {"passed": "passed", "failed": "failed", "error": "errors", "skipped": "skipped"}.get(result, "not_run")
        row[key] += 1
    return counts


def verified_counts(counts: dict) -> dict:
    """The per-backend counts summed into the backends that are recorded (triton ← triton and its
    streamed variant)."""
    merged = {}
    for backend, ids in VERIFIED_BACKENDS.items():
        row = dict(passed=0, failed=0, errors=0, skipped=0, not_run=0, total=0)
        for backend_id in ids:
            for key, value in counts.get(backend_id, {}).items():
                row[key] += value
        merged[backend] = row
    return merged


# --------------------------------------------------------------------------------------------
# running steps within the budget
# --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, budget: float, started: Optional[float] = None):
        self.started = time.monotonic() if started is None else started
        self.deadline = self.started + budget
        self.budget = budget

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allow(self, step: str, later: tuple, maximum: Optional[float] = None) -> float:
        """Seconds step ``step`` may take: its maximum, less what the later steps hold back."""
        held = sum(STEP_RESERVE.get(name, 0.0) for name in later)
        return max(0.0, min(STEP_MAX[step] if maximum is None else maximum, self.left() - held))


class Log:
    """The orchestrator's log: lines to stdout and to gpu-check.log."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.handle = open(path, "w")

    def __call__(self, message: str = "") -> None:
        stamp = time.strftime("%H:%M:%S")
        for line in message.splitlines() or [""]:
            print(f"[gpu-check {stamp}] {line}", flush=True)
            self.handle.write(f"[{stamp}] {line}\n")
        self.handle.flush()


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(command: list, budget: float, log_path: str, env: Optional[dict] = None,
                interrupt_first: bool = False) -> dict:
    """Run ``command`` (output to ``log_path``) for at most ``budget`` seconds. On time-out: SIGINT
    first when ``interrupt_first`` (pytest then writes its reports), then SIGTERM, then SIGKILL to
    its whole process group. Leftover children of the group are ended in any case.
    Returns {status: ok|failed|timeout|error, rc, seconds}."""
    started = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        try:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as error:
            log.write(f"could not start: {error}\n")
            return dict(status="error", rc=None, seconds=0.0, note=f"could not start: {error}")
        status = None
        try:
            grace = min(INTERRUPT_GRACE, budget / 4) if interrupt_first else 0.0
            process.wait(timeout=max(budget - grace, 1.0))
        except subprocess.TimeoutExpired:
            status = "timeout"
            log.write(f"\n*** gpu-check: time budget of {budget:.0f} s reached ***\n")
            log.flush()
            if interrupt_first:
                try:
                    process.send_signal(signal.SIGINT)
                    process.wait(timeout=max(grace, 1.0))
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:
                _kill_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _kill_group(process, signal.SIGKILL)
                    process.wait()
        _kill_group(process, signal.SIGKILL)  # workers, compile pools and the like left behind
        rc = process.returncode
    seconds = time.monotonic() - started
    if status is None:
        status = "ok" if rc == 0 else "failed"
    return dict(status=status, rc=rc, seconds=round(seconds, 1))


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------

PROBE = r'''
import importlib.metadata as md, importlib.util, json, os, platform, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine(),
        "cpus": os.cpu_count()}
def version(dist):
    try:
        return md.version(dist)
    except Exception:
        return None
for key, dist in (("triton", "triton"), ("pytest", "pytest"), ("xdist", "pytest-xdist"),
                  ("pytest_timeout", "pytest-timeout"), ("liger_kernel", "liger-kernel"),
                  ("setuptools", "setuptools"), ("ninja", "ninja"), ("numpy", "numpy")):
    info[key] = version(dist)
info["liger_importable"] = importlib.util.find_spec("liger_kernel") is not None
# a plugin counts only where this python imports it
for key, module in (("xdist", "xdist"), ("pytest_timeout", "pytest_timeout")):
    if importlib.util.find_spec(module) is None:
        info[key] = None
nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
info["nvcc"] = nvcc
if nvcc:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
        info["nvcc_version"] = out.strip().splitlines()[-1] if out.strip() else None
    except Exception as error:
        info["nvcc_version"] = f"error: {error}"
if shutil.which("nvidia-smi"):
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
        info["nvidia_smi"] = out.strip()
    except Exception as error:
        info["nvidia_smi"] = f"error: {error}"
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=f"sm_{major}{minor}",
                    arch_list=f"{major}.{minor}", gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
        free, total = torch.cuda.mem_get_info(0)
        info["gpu_free_gib"] = round(free / 2**30, 1)
except Exception as error:
    info["torch_error"] = f"{type(error).__name__}: {error}"
print("GPU_CHECK_PROBE " + json.dumps(info))
'''

#: after the build: which extensions and backends load, and what "auto" and available_backends say
IMPORT_CHECK = r'''
import importlib, json, sys
import torch
info = {}
for name in ("kdfast", "kdfast._C", "kdfast._C_cuda", "kdfast.backends.cpu", "kdfast.backends.triton",
             "kdfast.backends.cuda"):
    try:
        module = importlib.import_module(name)
        info[name] = "ok " + (getattr(module, "__file__", "") or "")
    except BaseException as error:
        info[name] = f"FAILED {type(error).__name__}: {str(error)[:300]}"
try:
    import kdfast
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info["available_backends"] = {loss: kdfast.available_backends(loss, device)
                                  for loss in ("kd_loss", "skd_loss", "nd_loss", "nystrom_loss")}
    info["kdfast_version"] = kdfast.__version__
except BaseException as error:
    info["available_backends"] = f"FAILED {type(error).__name__}: {error}"
print("GPU_CHECK_IMPORTS " + json.dumps(info))
'''

#: fallback build of kdfast._C_cuda with torch's JIT builder (no setuptools metadata involved)
JIT_CUDA_BUILD = r'''
import importlib.machinery, os, shutil, sys
import torch
from torch.utils.cpp_extension import load
sys.path.insert(0, os.getcwd())
from kdfast import _build as recipe
import kdfast.backends.cpu  # the operator schemas first
csrc = os.path.join(os.getcwd(), "csrc")
build_dir = os.path.join(os.getcwd(), "build", "gpu-check", "jit-cuda")
os.makedirs(build_dir, exist_ok=True)
load(name="_C_cuda", sources=[os.path.join(csrc, s) for s in recipe.CUDA_SOURCES], extra_include_paths=[csrc],
     extra_cflags=recipe.CXX_FLAGS, extra_cuda_cflags=recipe.NVCC_FLAGS, build_directory=build_dir,
     is_python_module=False, verbose=True)
suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
shutil.copy(os.path.join(build_dir, "_C_cuda.so"), os.path.join(os.getcwd(), "kdfast", "_C_cuda" + suffix))
print("built kdfast/_C_cuda" + suffix)
'''

#: calls kdfast.verified.record_run with each record (JSON lines on stdin); prints one result line per record
RECORD = r'''
import inspect, json, sys
records = [json.loads(line) for line in sys.stdin if line.strip()]
try:
    from kdfast.verified import record_run
except BaseException as error:
    print("GPU_CHECK_RECORD " + json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}))
    sys.exit(0)
parameters = inspect.signature(record_run).parameters
takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
for record in records:
    extra = record.pop("_extra", {})
    call = dict(record)
    for key, value in extra.items():
        if takes_any or key in parameters:
            call[key] = value
    if not extra.get("complete", True) and not (takes_any or "complete" in parameters):
        # the function cannot be told the run was cut short: the tests not run count as failed
        call["failed"] = call["failed"] + extra.get("not_run", 0)
    try:
        result = record_run(**call)
        print("GPU_CHECK_RECORD " + json.dumps({"ok": True, "backend": call.get("backend"),
                                                  "result": repr(result)[:200]}))
    except BaseException as error:
        print("GPU_CHECK_RECORD " + json.dumps({"ok": False, "backend": call.get("backend"),
                                                  "error": f"{type(error).__name__}: {error}"}))
'''


def parse_marker(log_path: str, marker: str) -> Optional[dict]:
    """The JSON after the last ``marker`` line of the log, or None."""
    found = None
    try:
        with open(log_path, errors="replace") as handle:
            for line in handle:
                if line.startswith(marker + " "):
                    try:
                        found = json.loads(line[len(marker) + 1:])
                    except ValueError:
                        pass
    except OSError:
        pass
    return found


def tree_digest(root: str = ROOT) -> str:
    """sha256 of the sources that decide the outcome (kdfast/ less its records and builds, csrc/,
    tests/, benchmarks/*.py, setup.py, pyproject.toml): names the tree a run saw when no git is there."""
    digest = hashlib.sha256()
    paths = []
    for top in ("kdfast", "csrc", "tests", "benchmarks"):
        for folder, dirs, names in os.walk(os.path.join(root, top)):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "results", "_csrc"))
            for name in names:
                if name.endswith((".py", ".cpp", ".cu", ".h", ".cuh")) and name != "verified.json":
                    paths.append(os.path.join(folder, name))
    paths += [os.path.join(root, name) for name in ("setup.py", "pyproject.toml") if os.path.exists(os.path.join(root, name))]
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()[:16]


def git_commit(root: str = ROOT) -> Optional[str]:
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def python_for_steps() -> str:
    return os.environ.get("GPU_CHECK_PYTHON") or sys.executable


def device_tag(name: Optional[str]) -> str:
    """As benchmarks.suite.device_tag: 'NVIDIA H200' → 'nvidia-h200'."""
    if not name:
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def tests_command(python: str, *, k: str, junit: str, workers: int, timeout: Optional[int],
                   extra: tuple = ()) -> list:
    command = [python, "-m", "pytest", "tests", "-q", "-k", k, "-p", "gpu_check", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", "junit_family=xunit2", "-rfE", "--tb=short"]
    if workers > 1:
        command += ["-n", str(workers)]
    if timeout:
        command += [f"--timeout={timeout}"]
    return command + list(extra)


def bench_command(python: str, *, families: tuple, dtype: str, compile_: str, time_limit: float,
                  prefix: str, out_dir: str, fake: bool, comment: str) -> list:
    command = [python, "-m", "benchmarks"]
    if fake:
        command += ["--tiny", "--device", "cpu", "--threads", "1", "--min-run-time", "0.002", "--no-plots"]
    else:
        command += ["--targets", "--device", "cuda", "--min-run-time", str(BENCH_MIN_RUN_TIME),
                    "--single-sample-after", "30"]
    return command + ["--dtype", dtype, "--families", *families, "--compile", compile_,
                      "--time-limit", f"{time_limit:.0f}", "--prefix", prefix, "--out-dir", out_dir,
                      "--comment", comment]


# --------------------------------------------------------------------------------------------
# the plan (also what --dry-run prints)
# --------------------------------------------------------------------------------------------


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def xdist_workers(cpus: int) -> int:
    return max(1, min(12, cpus - 2))


def describe_shape(shape: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in shape.items())


def print_plan(args, budget: float) -> None:
    python = python_for_steps()
    cpus = os.cpu_count() or 1
    xdist, timeout = _has_module("xdist"), _has_module("pytest_timeout")
    junit = os.path.join(args.work, "pytest-junit.xml")
    k = args.tests_k or TESTS_K
    lines = [
        "kdfast GPU check: plan (dry run; nothing is run, no GPU needed)",
        f"repository: {ROOT}",
        f"python: {python}",
        f"time budget: {budget:.0f} s in all (device tool: run with timeout_s=600); steps in order, each "
        "bounded, later steps keep their minimum (" + ", ".join(f"{k_} {v:.0f} s" for k_, v in STEP_RESERVE.items()) + ")",
        "",
        f"1. probe  (≤ {STEP_MAX['probe']:.0f} s): {shlex.join([python, '-c', '<probe>'])}",
        "   GPU name, compute capability, driver (nvidia-smi), torch / CUDA / Triton / Python / nvcc versions, "
        "pytest-xdist, pytest-timeout, Liger-Kernel; stops before the build when no CUDA GPU is seen",
        f"2. wheels (≤ {STEP_MAX['wheels']:.0f} s, only if .whl/*.whl exist): "
        f"{python} -m pip install -q --no-index --no-deps --no-compile --target build/gpu-check/site .whl/*.whl "
        "(then on PYTHONPATH)",
        f"3. build  (≤ {STEP_MAX['build']:.0f} s): MAX_JOBS={cpus} (all cores) TORCH_CUDA_ARCH_LIST=<probed, e.g. 9.0> "
        "KDFAST_CUDA_ARCHS=<e.g. 90> "
        f"{python} setup.py build_ext --inplace",
        "   (kdfast._C; kdfast._C_cuda when torch has CUDA and nvcc is found: /usr/local/cuda/bin is put on PATH if "
        "needed; no nvcc → recorded, Triton only)",
        "   then an import check of kdfast._C, kdfast._C_cuda and the cpu/triton/cuda backends; if setup.py failed "
        "without a compile error: kdfast._C_cuda through torch.utils.cpp_extension.load",
        f"4. tests  (≤ {STEP_MAX['tests']:.0f} s): "
        + shlex.join(tests_command(python, k=k, junit=junit, workers=xdist_workers(cpus) if xdist else 1,
                                    timeout=TEST_TIMEOUT if timeout else None)),
        f"   env: PYTHONPATH=scripts (the outcome-streaming plugin), KDFAST_TEST_BACKENDS=triton,cuda; "
        f"-n <cores−2, ≤ 12> only with pytest-xdist ({'here: yes' if xdist else 'here: not installed'}), "
        f"--timeout={TEST_TIMEOUT} only with pytest-timeout ({'here: yes' if timeout else 'here: not installed'})",
        f"   on time-out: SIGINT, {INTERRUPT_GRACE:.0f} s grace, then SIGTERM/SIGKILL; tests not reported count as "
        "'not run'; counts per backend id (triton, triton-streamed, cuda)",
        f"5. bench  (the rest, ≤ {STEP_MAX['bench']:.0f} s), python -m benchmarks --targets --device cuda "
        f"(min-run-time {BENCH_MIN_RUN_TIME} s), one process per run, each with --time-limit "
        "(compile cases last; a run given under "
        f"{BENCH_COMPILE_MIN:.0f} s skips torch.compile):",
    ]
    for name, families, dtype, compile_, most in BENCH_RUNS:
        lines.append(f"   {name} (≤ {most:.0f} s, {dtype}, torch.compile: {compile_} shapes):")
        for family in families:
            shapes = ", ".join(describe_shape(shape) for shape in GPU_TARGETS[family])
            lines.append(f"      {family}: {BENCH_KERNELS[family]} at {shapes}")
    lines += [
        "   providers: eager (kdfast.reference), compile (torch.compile of it), kdfast-triton, kdfast-cuda (when "
        "kdfast._C_cuda loads), liger (kd_loss only, when liger_kernel imports)",
        "   e.g. " + shlex.join(bench_command(python, families=BENCH_RUNS[0][1], dtype=BENCH_RUNS[0][2],
                                               compile_=BENCH_RUNS[0][3], time_limit=BENCH_RUNS[0][4] - BENCH_OVERHEAD,
                                               prefix="kdfast-gpu-targets-rows-bf16", out_dir="benchmarks/results",
                                               fake=False, comment="gpu-check <commit>")),
        "6. record: kdfast.verified.record_run(backend=triton|cuda, device=<GPU name>, capability=<sm_90>, "
        "date=<YYYY-MM-DD>, torch=, triton=, commit=, passed=, failed=, skipped=, command=<the pytest command>)",
        "   triton = triton + triton-streamed test ids; failed includes setup/teardown errors (and tests not run "
        "when the run was cut short and record_run takes no 'complete'); without kdfast.verified.record_run: "
        "verified-runs.json only",
        "7. outputs:",
        "   $OUT/ (flat, ≤ 8 files): " + ", ".join(OUT_FILES),
        f"      {TARBALL}: benchmarks/results/kdfast-gpu-targets-*_<gpu>_<date>.{{csv,md,png}}, "
        "benchmarks/results/gpu-check_<gpu>_<date>.{md,json}, gpu-check/*.log, the device's kdfast/verified.json",
        "   tree: benchmarks/results/kdfast-gpu-targets-{rows-bf16,fused-linear-bf16,features-fp32}_<gpu>_<date>.*, "
        "benchmarks/results/gpu-check_<gpu>_<date>.{md,json}; logs in build/gpu-check/",
        "   afterwards, here: bash scripts/gpu-check --unpack <files_at> (copies the results into benchmarks/results/, "
        "replays verified-runs.json through kdfast.verified.record_run)",
        "",
        "device tool: run(command=\"bash scripts/gpu-check\", timeout_s=600)   "
        "(optionally carry=[\".whl\"] holding liger_kernel-*.whl)",
    ]
    print("\n".join(lines))


# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------


class Check:
    def __init__(self, args):
        self.args = args
        self.fake = args.fake
        self.python = python_for_steps()
        self.work = args.work
        self.out = args.out
        self.results = args.results_dir or (os.path.join(self.work, "results") if self.fake else RESULTS)
        os.makedirs(self.work, exist_ok=True)
        for name in os.listdir(self.work):  # the last run's logs and outcomes
            if name.endswith((".log", ".jsonl", ".xml", ".json", ".tar.gz")):
                os.remove(os.path.join(self.work, name))
        os.makedirs(self.results, exist_ok=True)
        self.log = Log(os.path.join(self.work, "gpu-check.log"))
        self.clock = Clock(args.budget)
        self.steps: dict = {}
        self.probe: dict = {}
        self.imports: dict = {}
        self.tests: dict = {}
        self.bench: list = []
        self.records: list = []
        self.record_status: list = []
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["TQDM_DISABLE"] = "1"
        self.env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        self.date = datetime.date.today().isoformat()
        self.wall_started = time.time()
        self.started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.digest = tree_digest()
        self.commit = os.environ.get("KDFAST_COMMIT") or git_commit() or f"unknown (tree {self.digest})"
        self.written: list = []

    # -- bookkeeping
    def step(self, name: str, result: dict) -> dict:
        self.steps[name] = result
        note = f" ({result['note']})" if result.get("note") else ""
        budget = "" if result.get("budget") is None else f" of {result['budget']:.0f}"
        self.log(f"step {name}: {result['status']} in {result.get('seconds', 0):.0f} s{budget}{note}")
        return result

    def skipped(self, name: str, why: str) -> dict:
        return self.step(name, dict(status="skipped", seconds=0.0, note=why))

    def logfile(self, name: str) -> str:
        return os.path.join(self.work, f"{name}.log")

    # -- 1. probe
    def run_probe(self) -> None:
        budget = self.clock.allow("probe", ("tests", "bench", "finish"))
        path = self.logfile("probe")
        result = run_command([self.python, "-c", PROBE], budget, path, self.env)
        self.probe = parse_marker(path, "GPU_CHECK_PROBE") or {}
        if not self.probe and result["status"] == "ok":
            result["status"] = "failed"
        result["budget"] = budget
        self.step("probe", result)
        gpu = self.probe.get("gpu") or "no CUDA GPU"
        self.log(f"  {gpu} {self.probe.get('capability', '')} · torch {self.probe.get('torch')} (CUDA "
                 f"{self.probe.get('torch_cuda')}) · triton {self.probe.get('triton')} · python "
                 f"{self.probe.get('python')} · nvcc {self.probe.get('nvcc') or 'not found'} · xdist "
                 f"{self.probe.get('xdist')} · pytest-timeout {self.probe.get('pytest_timeout')} · liger "
                 f"{self.probe.get('liger_kernel')}")
        if self.probe.get("nvidia_smi"):
            self.log(f"  nvidia-smi: {self.probe['nvidia_smi']}")
        if result["status"] != "ok":
            self.log(tail(path))

    @property
    def has_gpu(self) -> bool:
        return bool(self.probe.get("cuda_available"))

    # -- 2. wheels
    def run_wheels(self) -> None:
        folder = os.path.join(ROOT, ".whl")
        wheels = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                        if name.endswith(".whl")) if os.path.isdir(folder) else []
        if not wheels:
            self.skipped("wheels", "no .whl/*.whl carried")
            return
        site = os.path.join(self.work, "site")
        budget = self.clock.allow("wheels", ("tests", "bench", "finish"))
        result = run_command([self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", site, *wheels], budget,
                             self.logfile("wheels"), self.env)
        result.update(budget=budget, note=", ".join(os.path.basename(w) for w in wheels))
        if result["status"] == "ok":
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, self.env.get("PYTHONPATH")]))
            # the probe ran before: look again whether Liger imports now
            check = subprocess.run([self.python, "-c", "import liger_kernel.transformers"], env=self.env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=120)
            self.probe["liger_importable"] = check.returncode == 0
            if check.returncode != 0:
                result["note"] += f"; liger_kernel.transformers does not import: {check.stderr.strip()[-200:]}"
        self.step("wheels", result)

    # -- 3. build
    def run_build(self) -> None:
        env = dict(self.env)
        nvcc = self.probe.get("nvcc")
        if nvcc and shutil.which("nvcc", path=env.get("PATH")) is None:
            env["PATH"] = os.path.dirname(nvcc) + os.pathsep + env.get("PATH", "")
            env.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
        if self.probe.get("arch_list"):
            env.setdefault("TORCH_CUDA_ARCH_LIST", self.probe["arch_list"])
            # only this GPU's architecture (honoured once kdfast/_build.py reads it; else ignored)
            env.setdefault("KDFAST_CUDA_ARCHS", self.probe["arch_list"].replace(".", ""))
        budget = self.clock.allow("build", ("tests", "bench", "finish"))
        if budget < MIN_STEP:
            self.skipped("build", f"only {budget:.0f} s left")
            return
        path = self.logfile("build")
        result = run_command([self.python, "setup.py", "build_ext", "--inplace"], budget, path, env)
        result["budget"] = budget
        notes = []
        if not nvcc:
            notes.append("no nvcc: kdfast._C_cuda not built, Triton only")
        elif not self.probe.get("torch_cuda"):
            notes.append("torch has no CUDA: kdfast._C_cuda not built")
        self.imports = self.import_check(env)
        cuda_ok = str(self.imports.get("kdfast._C_cuda", "")).startswith("ok")
        log_tail = tail(path, 600)
        compile_error = "ninja: build stopped" in log_tail or \
            re.search(r"\.(?:cu|cpp|cuh|h)(?:\(\d+\)|:\d+:\d+): (?:fatal )?error", log_tail) is not None
        if nvcc and self.probe.get("torch_cuda") and not cuda_ok and not compile_error:
            left = self.clock.allow("build", ("tests", "bench", "finish"))
            if left >= 60:
                notes.append("setup.py gave no kdfast._C_cuda without a compile error: JIT build")
                jit = run_command([self.python, "-c", JIT_CUDA_BUILD], left, path, env)
                notes.append(f"JIT build {jit['status']} in {jit['seconds']:.0f} s")
                result["seconds"] += jit["seconds"]
                self.imports = self.import_check(env)
                cuda_ok = str(self.imports.get("kdfast._C_cuda", "")).startswith("ok")
        for name in ("kdfast._C", "kdfast._C_cuda", "kdfast.backends.triton", "kdfast.backends.cuda"):
            value = str(self.imports.get(name, "not checked"))
            self.log(f"  {name}: {value[:200]}")
        if self.imports.get("available_backends"):
            self.log(f"  available_backends on the device: {self.imports['available_backends']}")
        if result["status"] != "ok":
            self.log(tail(path))
        if not str(self.imports.get("kdfast._C", "")).startswith("ok"):
            notes.append("kdfast._C does not import")
            result["status"] = "failed" if result["status"] == "ok" else result["status"]
        if self.has_gpu and nvcc and self.probe.get("torch_cuda") and not cuda_ok:
            # setup.py builds it as optional: a compile error leaves its exit status 0
            notes.append("kdfast._C_cuda does not import: the cuda tests will be skipped")
            result["status"] = "failed" if result["status"] == "ok" else result["status"]
        if self.probe.get("setuptools") and self.probe["setuptools"].split(".")[0].isdigit() and \
                int(self.probe["setuptools"].split(".")[0]) < 77:
            notes.append(f"setuptools {self.probe['setuptools']} < 77 (pyproject's licence field needs 77)")
        result["note"] = "; ".join(notes)
        result["cuda_extension"] = cuda_ok
        self.step("build", result)

    def import_check(self, env: dict) -> dict:
        path = self.logfile("imports")
        run_command([self.python, "-c", IMPORT_CHECK], 180, path, env)
        return parse_marker(path, "GPU_CHECK_IMPORTS") or {}

    # -- 4. tests
    def run_tests(self) -> None:
        budget = self.clock.allow("tests", ("bench", "finish"), maximum=self.args.tests_budget)
        if budget < MIN_STEP:
            self.skipped("tests", f"only {budget:.0f} s left")
            return
        events = os.path.join(self.work, "pytest-events.jsonl")
        junit = os.path.join(self.work, "pytest-junit.xml")
        for path in (events, junit):
            if os.path.exists(path):
                os.remove(path)
        cpus = self.probe.get("cpus") or os.cpu_count() or 1
        workers = self.args.test_workers or xdist_workers(cpus)
        if not self.probe.get("xdist") or self.args.no_xdist:
            workers = 1
        k = self.args.tests_k or (self.args.fake_tests_k if self.fake else TESTS_K)
        command = tests_command(self.python, k=k, junit=junit, workers=workers,
                                 timeout=TEST_TIMEOUT if self.probe.get("pytest_timeout") else None)
        env = dict(self.env)
        env[_EVENTS_ENV] = events
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SCRIPTS, env.get("PYTHONPATH")]))
        env["KDFAST_TEST_BACKENDS"] = "triton,cuda"
        result = run_command(command, budget, self.logfile("pytest"), env, interrupt_first=True)
        collected, outcome, messages = read_events(events)
        counts = count_by_backend(collected, outcome)
        merged = verified_counts(counts)
        # complete: every selected test reported an outcome (a run stopped at its budget may still be)
        complete = bool(collected) and all(row["not_run"] == 0 for row in counts.values())
        failures = sorted(nodeid for nodeid, value in outcome.items() if value in ("failed", "error"))
        self.tests = dict(command=shlex.join(command), counts=counts, verified=merged, complete=complete,
                          collected=None if collected is None else len(collected), reported=len(outcome),
                          failures=failures, messages={nodeid: messages.get(nodeid, "")[-600:] for nodeid in failures[:30]},
                          workers=workers, k=k)
        result["budget"] = budget
        if result["status"] == "failed" and failures:
            result["status"] = "ok"  # the tests ran; their failures are counted, not a failure of the step
            result["note"] = f"{len(failures)} failed"
        elif result["status"] == "failed" and result.get("rc") == 5:
            result["note"] = "no tests collected"
        if collected is None:
            result["note"] = (result.get("note", "") + "; nothing collected (see pytest.log)").strip("; ")
            self.log(tail(self.logfile("pytest")))
        self.step("tests", result)
        for backend, row in sorted(counts.items()):
            self.log(f"  {backend:16s} passed {row['passed']:5d}  failed {row['failed']:4d}  errors {row['errors']:3d}  "
                     f"skipped {row['skipped']:4d}  not run {row['not_run']:4d}")
        for nodeid in failures[:15]:
            self.log(f"  FAILED {nodeid}")

    # -- 5. bench
    def run_bench(self) -> None:
        if self.args.skip_bench:
            self.skipped("bench", "--skip-bench")
            return
        budget = self.clock.allow("bench", ("finish",))
        if budget < MIN_STEP:
            self.skipped("bench", f"only {budget:.0f} s left")
            return
        bench_clock = Clock(budget)
        statuses = []
        started = time.monotonic()
        for index, (name, families, dtype, compile_, most) in enumerate(BENCH_RUNS):
            later = len(BENCH_RUNS) - index - 1
            allowed = max(0.0, min(most, bench_clock.left() - later * (MIN_STEP + 20.0)))
            if allowed < BENCH_OVERHEAD + 10:
                self.bench.append(dict(name=name, status="skipped", note=f"{allowed:.0f} s left"))
                continue
            policy = compile_ if allowed >= BENCH_COMPILE_MIN else "none"
            prefix = f"kdfast-gpu-targets-{name}"
            command = bench_command(self.python, families=families, dtype=dtype, compile_=policy,
                                    time_limit=allowed - BENCH_OVERHEAD, prefix=prefix, out_dir=self.results,
                                    fake=self.fake, comment=f"scripts/gpu-check at {self.commit}, {self.started_at}")
            result = run_command(command, allowed, self.logfile(f"bench-{name}"), self.env)
            # benchmarks names its files <prefix>_<its device tag>_<date>.*
            files = sorted(os.path.join(self.results, f) for f in os.listdir(self.results)
                           if f.startswith(prefix + "_") and f"_{self.date}" in f
                           and os.path.getmtime(os.path.join(self.results, f)) >= self.wall_started - 1)
            csv_path = next((f for f in files if f.endswith(".csv")), "")
            md_path = next((f for f in files if f.endswith(".md")), "")
            entry = dict(name=name, status=result["status"], seconds=result["seconds"], budget=round(allowed),
                         compile=policy, dtype=dtype, families=list(families), command=shlex.join(command),
                         csv=csv_path if os.path.exists(csv_path) else None,
                         markdown=md_path if os.path.exists(md_path) else None, files=files)
            skipped_cases = [line.strip() for line in tail(self.logfile(f"bench-{name}"), 200).splitlines()
                             if "skipped, time limit" in line or ": failed," in line]
            entry["notes"] = skipped_cases[:20]
            self.bench.append(entry)
            self.log(f"  bench {name}: {result['status']} in {result['seconds']:.0f} s of {allowed:.0f} "
                     f"(compile: {policy}){'' if entry['markdown'] else ' — no results written'}")
            if result["status"] != "ok":
                self.log(tail(self.logfile(f"bench-{name}"), 15))
            statuses.append(result["status"])
        status = "ok" if statuses and all(s == "ok" for s in statuses) and \
            all(b["status"] == "ok" for b in self.bench) else ("failed" if statuses else "skipped")
        self.step("bench", dict(status=status, seconds=round(time.monotonic() - started, 1), budget=budget,
                                note=", ".join(f"{b['name']} {b['status']}" for b in self.bench)))

    # -- 6. record
    def run_record(self) -> None:
        if not self.tests:
            self.skipped("record", "no test results")
            return
        gpu = self.probe.get("gpu") or ("cpu (fake run)" if self.fake else "unknown")
        for backend, row in self.tests["verified"].items():
            if row["total"] == 0:
                continue
            record = dict(backend=backend, device=gpu, capability=self.probe.get("capability") or "none",
                          date=self.date, torch=self.probe.get("torch"), triton=self.probe.get("triton"),
                          commit=self.commit, passed=row["passed"], failed=row["failed"] + row["errors"],
                          skipped=row["skipped"], command=self.tests["command"])
            record["_extra"] = dict(complete=self.tests["complete"], not_run=row["not_run"],
                                    cuda=self.probe.get("torch_cuda"), driver=self.probe.get("nvidia_smi"),
                                    tree=self.digest, fake=self.fake)
            self.records.append(record)
        if self.fake and not self.args.record_fake:
            self.step("record", dict(status="skipped", seconds=0.0,
                                     note="fake run: records written to verified-runs.json only"))
            return
        lines = "".join(json.dumps(record) + "\n" for record in self.records)
        path = self.logfile("record")
        started = time.monotonic()
        try:
            done = subprocess.run([self.python, "-c", RECORD], input=lines, capture_output=True, text=True,
                                  cwd=ROOT, env=self.env, timeout=120)
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            output = f"timed out: {error}"
        with open(path, "w") as handle:
            handle.write(output)
        self.record_status = [json.loads(line.split(" ", 1)[1]) for line in output.splitlines()
                              if line.startswith("GPU_CHECK_RECORD ")]
        ok = bool(self.record_status) and all(item.get("ok") for item in self.record_status)
        note = "kdfast.verified.record_run: " + "; ".join(
            f"{item.get('backend', '')} {'ok' if item.get('ok') else item.get('error')}" for item in self.record_status) \
            if self.record_status else "record_run not reached: " + output.strip()[-200:]
        self.step("record", dict(status="ok" if ok else "failed", seconds=round(time.monotonic() - started, 1),
                                 note=note + ("" if ok else " → verified-runs.json only")))

    # -- 7. outputs
    def summary(self) -> dict:
        return dict(kind="kdfast gpu-check", fake=self.fake, started=self.started_at, date=self.date,
                    seconds=round(self.clock.elapsed(), 1), budget=self.clock.budget, commit=self.commit,
                    tree=self.digest, probe=self.probe, imports=self.imports, steps=self.steps, tests=self.tests,
                    bench=self.bench, records=self.records, record_status=self.record_status)

    def markdown(self, summary: dict) -> str:
        probe = self.probe
        text = [f"# kdfast GPU check{' (FAKE: CPU rehearsal)' if self.fake else ''}", "",
                f"- device: {probe.get('gpu') or 'no CUDA GPU'} ({probe.get('capability') or '—'}, "
                f"{probe.get('gpu_memory_gib', '—')} GiB, {probe.get('sms', '—')} SMs); nvidia-smi: "
                f"{probe.get('nvidia_smi') or '—'}",
                f"- versions: torch {probe.get('torch')} (CUDA {probe.get('torch_cuda')}), triton {probe.get('triton')}, "
                f"python {probe.get('python')}, nvcc {probe.get('nvcc_version') or probe.get('nvcc') or 'not found'}, "
                f"kdfast {self.imports.get('kdfast_version', '—')}, liger-kernel {probe.get('liger_kernel') or 'not installed'}",
                f"- commit: {self.commit} · tree sha256 {self.digest}",
                f"- started {self.started_at} · took {summary['seconds']:.0f} s of a {self.clock.budget:.0f} s budget",
                "", "## Steps", "", "| step | status | seconds | budget | note |", "|---|---|---|---|---|"]
        for name, step in self.steps.items():
            budget = step.get("budget")
            text.append(f"| {name} | {step['status']} | {step.get('seconds', 0):.0f} | "
                        f"{'—' if budget is None else f'{budget:.0f}'} | {str(step.get('note', '')).replace('|', '/')} |")
        if self.imports:
            text += ["", "## Extensions and backends after the build", ""]
            text += [f"- `{name}`: {str(value)[:300]}" for name, value in self.imports.items()]
        if self.tests:
            text += ["", "## Tests (triton and cuda backends)", "",
                     f"`{self.tests['command']}`", "",
                     f"collected {self.tests['collected']}, reported {self.tests['reported']}, "
                     f"complete: {self.tests['complete']}", "",
                     "| backend id | passed | failed | errors | skipped | not run | total |", "|---|---|---|---|---|---|---|"]
            for backend, row in sorted(self.tests["counts"].items()):
                text.append(f"| {backend} | {row['passed']} | {row['failed']} | {row['errors']} | {row['skipped']} | "
                            f"{row['not_run']} | {row['total']} |")
            if self.tests["failures"]:
                text += ["", f"### Failed ({len(self.tests['failures'])})", ""]
                text += [f"- `{nodeid}`" for nodeid in self.tests["failures"][:100]]
                for nodeid, message in list(self.tests["messages"].items())[:10]:
                    text += ["", f"`{nodeid}`:", "", "```", message.strip()[-600:], "```"]
        if self.records:
            text += ["", "## Verification records", ""]
            for record in self.records:
                shown = {k: v for k, v in record.items() if k != "command"}
                text.append(f"- {json.dumps(shown)}")
            for item in self.record_status:
                text.append(f"- record_run: {json.dumps(item)}")
        if self.bench:
            text += ["", "## Benchmarks", ""]
            for entry in self.bench:
                text.append(f"- {entry['name']}: {entry['status']}"
                            + (f" in {entry['seconds']:.0f} s (compile: {entry['compile']})" if 'seconds' in entry else "")
                            + (f", {os.path.relpath(entry['markdown'], ROOT)}" if entry.get("markdown") else ""))
            for entry in self.bench:
                if entry.get("markdown"):
                    with open(entry["markdown"]) as handle:
                        body = handle.read()
                    start = body.find("\n## ")
                    text += ["", f"### {entry['name']}", "", body[start + 1:] if start >= 0 else body]
        return "\n".join(text) + "\n"

    def write_outputs(self) -> None:
        summary = self.summary()
        if not self.has_gpu and not self.fake and not self.args.results_dir:
            # a run that found no GPU leaves benchmarks/results/ alone
            self.results = os.path.join(self.work, "results")
            os.makedirs(self.results, exist_ok=True)
        tag = "cpu-fake" if self.fake else device_tag(self.probe.get("gpu"))
        stem = os.path.join(self.results, f"gpu-check_{tag}_{self.date}")
        markdown = self.markdown(summary)
        for path, text in ((stem + ".md", markdown), (stem + ".json", json.dumps(summary, indent=1, default=str) + "\n")):
            with open(path, "w") as handle:
                handle.write(text)
        records = "".join(json.dumps({**{k: v for k, v in r.items() if k != "_extra"}, **r["_extra"]}) + "\n"
                          for r in self.records)
        with open(os.path.join(self.work, "verified-runs.json"), "w") as handle:
            handle.write(records)
        # the tarball: results by their path in the tree, logs under gpu-check/
        tar_path = os.path.join(self.work, TARBALL)
        result_files = [stem + ".md", stem + ".json"] + [f for entry in self.bench for f in entry.get("files", [])]
        with tarfile.open(tar_path, "w:gz") as tar:
            for path in dict.fromkeys(result_files):
                if os.path.exists(path):
                    # a fake run's results are no results: --unpack leaves them out
                    arcname = os.path.join("fake-results" if self.fake else "benchmarks/results", os.path.basename(path))
                    tar.add(path, arcname=arcname)
            for name in sorted(os.listdir(self.work)):
                path = os.path.join(self.work, name)
                if os.path.isfile(path) and name.endswith((".log", ".jsonl", ".xml", ".json")):
                    tar.add(path, arcname=os.path.join("gpu-check", name))
            verified = os.path.join(ROOT, "kdfast", "verified.json")
            if os.path.exists(verified):
                tar.add(verified, arcname=os.path.join("gpu-check", "verified.device.json"))
        self.written = [stem + ".md", stem + ".json", tar_path]
        if self.out:
            os.makedirs(self.out, exist_ok=True)
            copies = {"gpu-check-summary.md": stem + ".md", "gpu-check-summary.json": stem + ".json",
                      "verified-runs.json": os.path.join(self.work, "verified-runs.json"),
                      "pytest-junit.xml": os.path.join(self.work, "pytest-junit.xml"), TARBALL: tar_path}
            for name, source in copies.items():
                if os.path.exists(source):
                    shutil.copy(source, os.path.join(self.out, name))
                    self.written.append(os.path.join(self.out, name))
        self.log("summary: " + ", ".join(os.path.relpath(p, ROOT) if p.startswith(ROOT) else p for p in self.written))
        self.print_short(summary)
        if self.out:  # the log last, so that it holds everything above
            self.log.handle.flush()
            shutil.copy(self.log.path, os.path.join(self.out, "gpu-check.log"))

    def print_short(self, summary: dict) -> None:
        lines = ["", "==== kdfast gpu-check summary ====",
                 f"{self.probe.get('gpu') or 'no CUDA GPU'} {self.probe.get('capability') or ''} · torch "
                 f"{self.probe.get('torch')} · triton {self.probe.get('triton')} · commit {self.commit} · "
                 f"{summary['seconds']:.0f} s"]
        for name, step in self.steps.items():
            lines.append(f"  {name:7s} {step['status']:8s} {step.get('seconds', 0):5.0f} s  {step.get('note', '')}"[:220])
        if self.tests:
            for backend, row in self.tests["verified"].items():
                lines.append(f"  tests {backend:6s}: passed {row['passed']} failed {row['failed']} errors "
                             f"{row['errors']} skipped {row['skipped']} not run {row['not_run']}")
        for entry in self.bench:
            lines.append(f"  bench {entry['name']}: {entry['status']}")
        print("\n".join(lines), flush=True)

    def exit_code(self) -> int:
        bad_step = any(step["status"] in ("failed", "timeout", "error") for step in self.steps.values())
        failed = any(row["failed"] + row["errors"] for row in self.tests.get("counts", {}).values())
        return 1 if bad_step or failed or not self.tests.get("complete", False) else 0

    def run(self) -> int:
        self.log(f"kdfast gpu-check{' (fake)' if self.fake else ''}: budget {self.clock.budget:.0f} s, "
                 f"python {self.python}, commit {self.commit}")
        try:
            self.run_probe()
            if not self.has_gpu and not self.fake:
                for name in ("wheels", "build", "tests", "bench"):
                    self.skipped(name, "no CUDA GPU seen by torch (use --fake to rehearse on a CPU)")
            else:
                self.run_wheels()
                if self.args.skip_build:
                    self.skipped("build", "--skip-build")
                    self.imports = self.import_check(self.env)
                else:
                    self.run_build()
                self.run_tests()
                self.run_bench()
            self.run_record()
        except Exception as error:  # the summary is written whatever happened above
            import traceback
            self.log("gpu-check itself failed: " + "".join(traceback.format_exception(error))[-2000:])
            self.steps["gpu-check"] = dict(status="error", seconds=0.0, note=f"{type(error).__name__}: {error}")
        self.write_outputs()
        return self.exit_code()


# --------------------------------------------------------------------------------------------
# --unpack: after a device run, here
# --------------------------------------------------------------------------------------------


def unpack(folder: str, record: bool) -> int:
    tar_path = os.path.join(folder, TARBALL)
    if not os.path.exists(tar_path):
        print(f"no {TARBALL} in {folder}", file=sys.stderr)
        return 1
    copied = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if not member.isfile() or ".." in parts or member.name.startswith("/") or \
                    parts[:2] != ["benchmarks", "results"] or len(parts) != 3:
                continue
            source = tar.extractfile(member)
            target = os.path.join(ROOT, *parts)
            with open(target, "wb") as handle:
                shutil.copyfileobj(source, handle)
            copied.append(os.path.relpath(target, ROOT))
    print("copied into the tree:\n  " + "\n  ".join(copied))
    records_path = os.path.join(folder, "verified-runs.json")
    if not record or not os.path.exists(records_path):
        return 0
    with open(records_path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    digest = tree_digest()
    lines = []
    for item in records:
        if item.get("fake"):
            print(f"not replayed (fake run): {item.get('backend')}")
            continue
        extra_keys = ("complete", "not_run", "cuda", "driver", "tree", "fake")
        record_kwargs = {k: v for k, v in item.items() if k not in extra_keys}
        if str(record_kwargs.get("commit", "")).startswith("unknown") and item.get("tree") == digest:
            record_kwargs["commit"] = git_commit() or record_kwargs["commit"]
        elif item.get("tree") != digest:
            print(f"note: the device ran tree {item.get('tree')}, this tree is {digest} (sources changed since)")
        record_kwargs["_extra"] = {k: item[k] for k in extra_keys if k in item}
        lines.append(json.dumps(record_kwargs) + "\n")
    if not lines:
        return 0
    done = subprocess.run([sys.executable, "-c", RECORD], input="".join(lines), capture_output=True, text=True,
                          cwd=ROOT)
    print(done.stdout + done.stderr)
    return 0 if "GPU_CHECK_RECORD" in done.stdout and '"ok": false' not in done.stdout else 1


# --------------------------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--fake", action="store_true",
                        help="rehearse on a CPU: same steps, CPU build, a few interpreter tests, --tiny benchmark")
    parser.add_argument("--unpack", metavar="DIR", help="copy a device run's results (DIR: files_at) into the tree")
    parser.add_argument("--no-record", action="store_true", help="with --unpack: do not replay the records")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", DEFAULT_BUDGET)),
                        help=f"seconds for everything (default {DEFAULT_BUDGET:.0f}; env GPU_CHECK_BUDGET)")
    parser.add_argument("--tests-budget", type=float, default=STEP_MAX["tests"],
                        help=f"most seconds for the tests (default {STEP_MAX['tests']:.0f})")
    parser.add_argument("--tests-k", help=f"pytest -k expression (default: {TESTS_K!r})")
    parser.add_argument("--fake-tests-k", default="(triton or cuda) and (test_dtypes or test_streamed_path) and float32",
                        help="the -k expression of a --fake run")
    parser.add_argument("--no-xdist", action="store_true", help="run the tests in one process")
    parser.add_argument("--test-workers", type=int, help="pytest-xdist workers (default: cores − 2, at most 12)")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--record-fake", action="store_true",
                        help="--fake: call kdfast.verified.record_run too (it writes kdfast/verified.json)")
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="folder brought back (default $OUT)")
    parser.add_argument("--work", default=WORK, help="logs and scratch (default build/gpu-check)")
    parser.add_argument("--results-dir", help="where results go (default benchmarks/results; --fake: <work>/results)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.unpack:
        return unpack(args.unpack, record=not args.no_record)
    if args.dry_run:
        print_plan(args, args.budget)
        return 0
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
