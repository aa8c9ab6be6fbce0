"""What kdfast runs on here: ``python -m kdfast.info``.

Prints the torch, Triton and kdfast versions; how and where the CPU kernels were built and the
instruction set (SIMD level) they use; for each device type (cpu, cuda) every backend, whether it
can run and why not, whether ``backend="auto"`` picks it, and whether it has passed the whole
test suite on such hardware (:mod:`kdfast.verified`). :func:`report` returns the same as a dict.

Nothing is compiled: when the CPU kernels are not built yet (they are compiled for the installed
torch on first use), the report says so; ``python -m kdfast.info --build`` builds them first.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Optional

import torch

from . import _dispatch, verified
from ._version import __version__

DEVICE_TYPES = ("cpu", "cuda")


def _triton_version() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
        return getattr(triton, "__version__", "unknown")
    except ImportError as error:
        return f"installed but does not import ({error})"


def cpu_kernels() -> dict:
    """How the CPU kernels of this process were obtained: {"how": "installed" | "cached" |
    "compiled" | "not built" | "failed", "path", "simd" (the instruction-set build in use, or None),
    "error" (when they do not load)}."""
    from . import _build

    info = {"how": "not built", "path": None, "simd": None, "error": None}
    build_info = getattr(_build, "BUILD_INFO", {})
    if build_info:
        info.update(how=build_info.get("how"), path=build_info.get("path"))
    else:
        extension = sys.modules.get("kdfast._C")
        spec = None if extension is not None else importlib.util.find_spec("kdfast._C")
        path = getattr(extension, "__file__", None) or (spec.origin if spec is not None else None)
        if path is not None:
            info.update(how="installed", path=path)
    if "cpu" in _dispatch._LOADED:
        info["simd"] = str(torch.ops.kdfast.cpu_capability())
    elif "cpu" in _dispatch._LOAD_FAILURES:
        info.update(how="failed", error=_dispatch._LOAD_FAILURES["cpu"])
    return info


def _verification(backend: str, device_type: str, capability: Optional[str], runs: list[dict]) -> dict:
    """{"verified": bool, "how": a sentence} for one backend on one kind of hardware; None and ""
    for a backend that has no kernels for that device type."""
    if backend not in _dispatch.AUTO_ORDER.get(device_type, ()) and backend != "triton":
        return {"verified": None, "how": ""}
    if backend in verified.VERIFIED_BY_CI.get(device_type, ()):
        return {"verified": True, "how": "the CPU CI runs the whole test suite on every change"}
    latest = verified.latest_runs(runs)
    if capability is not None and (backend, capability) in latest:
        run = latest[(backend, capability)]
        return {"verified": verified.run_passed(run),
                "how": (f"latest recorded run on {capability}: {run.get('passed')} passed, {run.get('failed')} "
                        f"failed, {run.get('skipped')} skipped on {run.get('device')} ({run.get('date')}, "
                        f"torch {run.get('torch')}, triton {run.get('triton')})")}
    elsewhere = sorted(capability for (name, capability) in latest if name == backend)
    where = f" (recorded on {', '.join(elsewhere)})" if elsewhere else ""
    if backend == "triton" and device_type == "cpu":
        return {"verified": False, "how": "runs on CPU tensors only under the Triton interpreter, as in the tests"}
    if backend == "triton":
        return {"verified": False, "how": "no GPU run recorded for this hardware" + where + "; CI checks it under "
                "the Triton interpreter and compiles it ahead of time for sm_80 and sm_90"}
    if backend == "reference":
        return {"verified": False, "how": "plain PyTorch; its suite runs on CPU in CI" + where}
    return {"verified": False, "how": "no passing run of the whole suite recorded for this hardware" + where}


def _device_report(device_type: str, runs: list[dict], defer: dict[str, str]) -> dict:
    device = torch.device(device_type)
    present = device_type == "cpu" or (torch.version.cuda is not None and torch.cuda.is_available())
    capability = verified.capability_of(device) if present else None
    backends = {}
    for name, status in _dispatch.backend_status(device, defer=defer).items():
        backends[name] = dict(status, **_verification(name, device_type, capability, runs))
    return {"present": present, "name": verified.device_name(device) if present else None,
            "capability": capability, "backends": backends}


def report(build: bool = False) -> dict:
    """The versions, the CPU kernels' build and the backends per device type, as a dict. With
    ``build``, CPU kernels that are not built yet are compiled first (1–5 minutes)."""
    defer = {}
    if "cpu" not in _dispatch._LOADED and "cpu" not in _dispatch._LOAD_FAILURES:
        if build or _dispatch._cpu_kernels_built():
            _dispatch._import_backend("cpu")
        else:
            defer["cpu"] = ("not built yet: compiled for this torch on first use (1–5 minutes; "
                            "`python -m kdfast.info --build` does it now)")
    runs = verified.load_runs()
    return {
        "kdfast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": sys.version.split()[0],
        "cpu_kernels": cpu_kernels(),
        "devices": {device_type: _device_report(device_type, runs, defer) for device_type in DEVICE_TYPES},
        "verification_record": verified.RECORD_PATH,
    }


def format_report(info: dict) -> str:
    """The report as the text ``python -m kdfast.info`` prints."""
    kernels = info["cpu_kernels"]
    lines = [
        f"kdfast  {info['kdfast']}",
        f"torch   {info['torch']} (CUDA {info['torch_cuda'] or 'none: a CPU-only build'})",
        f"triton  {info['triton'] or 'not installed'}",
        f"python  {info['python']}",
        "",
        f"CPU kernels: {kernels['how']}" + (f" at {kernels['path']}" if kernels["path"] else ""),
        f"  SIMD level in use: {kernels['simd'] or 'unknown (the CPU kernels are not loaded)'}",
    ]
    if kernels.get("error"):
        lines.append(f"  error: {kernels['error']}")
    for device_type, device in info["devices"].items():
        lines.append("")
        if not device["present"]:
            reasons = {backend["reason"] for backend in device["backends"].values()}
            lines.append(f"{device_type}: no device here ({'; '.join(sorted(reasons))})")
        else:
            lines.append(f"{device_type}: {device['name']} ({device['capability']})")
        auto_choice = next((name for name, backend in device["backends"].items() if backend["auto"]), None)
        for name, backend in device["backends"].items():
            if backend["verified"] is None and not backend["available"]:
                continue  # no kernels for this device type
            verification = "" if backend["verified"] is None else \
                f"{'verified' if backend['verified'] else 'not verified'}: {backend['how']}"
            if not device["present"]:
                lines.append(f"  {name:<10} {verification}")
                continue
            state = "available" if backend["available"] else "unavailable"
            if name == auto_choice:
                state += ", picked by auto"
            elif backend["auto"]:
                state += ", auto's fallback"
            lines.append(f"  {name:<10} {state}" + (f" — {backend['reason']}" if backend["reason"] else ""))
            if verification:
                lines.append(f"  {'':<10} {verification}")
    lines += ["", f"verification record: {info['verification_record']}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdfast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="compile the CPU kernels first if they are not built")
    arguments = parser.parse_args(argv)
    print(format_report(report(build=arguments.build)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
