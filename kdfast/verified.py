"""The verification record: which backends have passed kdfast's whole test suite on which hardware.

``kdfast/verified.json`` (committed with the package) holds one entry per run of the suite on real
hardware::

    {"schema": 1, "runs": [{"backend": "cuda", "device": "NVIDIA H100 80GB HBM3", "capability": "sm_90",
                            "date": "2026-12-01", "torch": "2.11.0", "triton": "3.6.0", "commit": "d839ca7",
                            "passed": 812, "failed": 0, "skipped": 31, "command": "scripts/gpu-check"}]}

A GPU check appends its result with :func:`record_run`. ``backend="auto"`` uses a backend that
needs a recorded run (the CUDA C++ kernels: ``kdfast._dispatch.AUTO_NEEDS_RECORDED_RUN``) only on
hardware of a compute capability whose latest run of that backend has ``failed == 0``.

CPU: the CPU-only CI runs the whole suite for the ``reference`` and ``cpu`` backends on every
change, so they count as verified on any CPU without an entry (:data:`VERIFIED_BY_CI`); the Triton
kernels run there only under the Triton interpreter, which is a test of their logic, not of a GPU.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Optional

import torch

SCHEMA = 1
RECORD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verified.json")
BACKENDS = ("reference", "cpu", "triton", "cuda")
#: every field of a run, in the order they are written
FIELDS = ("backend", "device", "capability", "date", "torch", "triton", "commit", "passed", "failed", "skipped",
          "command")
COUNT_FIELDS = ("passed", "failed", "skipped")
#: device type → backends whose whole suite the CPU-only CI runs on every change
VERIFIED_BY_CI = {"cpu": frozenset({"reference", "cpu"})}


def load_runs(path: Optional[str] = None) -> list[dict]:
    """The recorded runs, oldest first ([] when the record file is missing)."""
    path = RECORD_PATH if path is None else path
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return []
    if record.get("schema") != SCHEMA:
        raise ValueError(f"{path} has schema {record.get('schema')!r}; this kdfast reads schema {SCHEMA}")
    return list(record.get("runs", []))


def capability_of(device: torch.device | str) -> str:
    """The hardware class a run stands for: ``"sm_<major><minor>"`` for a CUDA device (its compute
    capability), the machine architecture for a CPU (``"x86-64"``, ``"aarch64"``)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    if device.type == "cpu":
        return (platform.machine() or "cpu").lower().replace("_", "-")
    return device.type


def device_name(device: torch.device | str) -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, the CPU model for a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                for line in handle:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "cpu"
    return device.type


def latest_runs(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """(backend, capability) → the most recent run (by date, then by position in the record)."""
    latest: dict[tuple[str, str], tuple[tuple[str, int], dict]] = {}
    for position, run in enumerate(runs):
        key = (run.get("backend"), run.get("capability"))
        order = (str(run.get("date", "")), position)
        if key not in latest or order >= latest[key][0]:
            latest[key] = (order, run)
    return {key: run for key, (_, run) in latest.items()}


def run_passed(run: dict) -> bool:
    """A run verifies its backend when nothing failed, something ran, the suite ran to its end
    (``complete`` is not False) and it was on real hardware (``fake`` is not true)."""
    return (int(run.get("failed", 1)) == 0 and int(run.get("passed", 0)) > 0
            and run.get("complete", True) is not False and not run.get("fake", False))


def verified_capabilities(backend: str, runs: Optional[list[dict]] = None) -> frozenset[str]:
    """The capabilities on which the latest recorded run of ``backend`` passed."""
    runs = load_runs() if runs is None else runs
    return frozenset(capability for (name, capability), run in latest_runs(runs).items()
                     if name == backend and run_passed(run))


def verified_backends(device: torch.device | str = "cpu", runs: Optional[list[dict]] = None) -> set[str]:
    """The backends that have passed the whole suite on hardware like ``device``: those the CI runs
    for its device type, and those whose latest recorded run on its capability passed."""
    device = torch.device(device)
    runs = load_runs() if runs is None else runs
    capability = capability_of(device)
    recorded = {name for (name, run_capability), run in latest_runs(runs).items()
                if run_capability == capability and run_passed(run)}
    return set(VERIFIED_BY_CI.get(device.type, ())) | recorded


def _installed_triton_version() -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("triton")
    except PackageNotFoundError:
        return None


def record_run(*, path: Optional[str] = None, **fields) -> dict:
    """Append one run to the record and return it. Required: ``backend``, ``passed``, ``failed``,
    ``skipped``, ``command``; ``device`` and ``capability`` default to the current CUDA device (for
    the cuda and triton backends) or this CPU, ``date`` to today (UTC), ``torch`` and ``triton`` to
    the installed versions, ``commit`` to ``None``. Other fields (JSON values, e.g. ``complete``,
    ``fake``, ``driver``) are stored after these; ``complete=False`` or ``fake=True`` make a run
    that verifies nothing (:func:`run_passed`)."""
    for name in ("backend", "command", *COUNT_FIELDS):
        if name not in fields:
            raise TypeError(f"record_run needs {name}")
    if fields["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {fields['backend']!r}")
    for name in COUNT_FIELDS:
        value = fields[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if "device" not in fields or "capability" not in fields:
        device = torch.device("cuda") if fields["backend"] in ("cuda", "triton") else torch.device("cpu")
        fields.setdefault("device", device_name(device))
        fields.setdefault("capability", capability_of(device))
    fields.setdefault("date", datetime.datetime.now(datetime.timezone.utc).date().isoformat())
    fields.setdefault("torch", torch.__version__)
    fields.setdefault("triton", _installed_triton_version())
    fields.setdefault("commit", None)
    run = {name: fields[name] for name in FIELDS}
    run.update((name, value) for name, value in fields.items() if name not in FIELDS)
    json.dumps(run)  # a value JSON cannot hold fails here, before the record is touched

    path = RECORD_PATH if path is None else path
    runs = load_runs(path) + [run]
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"schema": SCHEMA, "runs": runs}, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)
    return run
