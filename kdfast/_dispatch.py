"""The one place that chooses a backend.

A backend is a module exposing ``LOSSES`` (public loss name → implementation taking checked 2-D
tensors and the same keywords as the reference) and, optionally, ``unavailable_reason(device)``
returning ``None`` when it can run on that device or a sentence saying why not.

Choosing must trace cleanly under ``torch.compile`` from the first call, so no import,
registration or file read happens here while a step is traced: the backends that can serve this
machine are imported when kdfast is imported (:func:`preload_backends`) — cheaply, only when their
compiled artefacts already exist — and the choice is then made from dict lookups of loaded
modules. A backend that is still missing when asked for is imported outside the graph
(``torch.compiler.disable``): at worst one graph break, never an error in a default compile.

``backend="auto"`` takes the first backend of :data:`AUTO_ORDER` that can run the loss on the
tensors' device and is verified there (:mod:`kdfast.verified`). Falling back to the reference
although the device type has fused kernels is reported once per device type with a
:class:`ReferenceFallbackWarning` saying why: when it is certain (a backend's import failed, at
kdfast's import or later), or at the first eager call that falls back — never from inside a traced
region, where a warning would break the graph.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from typing import Callable, Optional

import torch

from . import verified

#: backend name → module implementing it
BACKEND_MODULES = {
    "reference": "kdfast.reference",
    "cpu": "kdfast.backends.cpu",
    "triton": "kdfast.backends.triton",
    "cuda": "kdfast.backends.cuda",
}

#: what "auto" tries, per device type, in this order; the reference runs everywhere. On CUDA the
#: Triton kernels (run under the interpreter in CI and compiled ahead of time for sm_80/sm_90 there)
#: come before the CUDA C++ kernels.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

#: device type → backends that "auto" uses there only on hardware of a compute capability whose
#: latest recorded run of the whole suite passed (kdfast/verified.json); by name they always run
AUTO_NEEDS_RECORDED_RUN = {"cuda": frozenset({"cuda"})}

class ReferenceFallbackWarning(UserWarning):
    """``backend="auto"`` runs the plain-PyTorch reference although the device type has fused
    kernels (they are not built, do not load, or their toolchain is missing)."""


#: backend → its imported module
_LOADED: dict[str, object] = {}
#: backend → why its module cannot be imported here
_LOAD_FAILURES: dict[str, str] = {}
#: device types whose fallback to the reference was reported
_FALLBACK_REPORTED: set[str] = set()
#: backend → compute capabilities ("sm_90") with a passing recorded run
_RECORDED_CAPABILITIES: dict[str, frozenset[str]] = {}
#: CUDA device index → its compute capability ("sm_90")
_CUDA_CAPABILITIES: dict[int, str] = {}


def _import_backend(backend: str) -> tuple[Optional[object], Optional[str]]:
    """Import a backend's module once; (module, None) or (None, why it cannot be imported)."""
    if backend in _LOADED:
        return _LOADED[backend], None
    if backend in _LOAD_FAILURES:
        return None, _LOAD_FAILURES[backend]
    try:
        module = importlib.import_module(BACKEND_MODULES[backend])
    except ImportError as error:  # not built, or its toolchain (triton, the extension) missing
        _LOAD_FAILURES[backend] = f"it is not installed or not built here ({error})"
        _report_known_fallbacks()
        return None, _LOAD_FAILURES[backend]
    _LOADED[backend] = module
    return module, None


def _import_backend_outside_graph(backend: str):
    """:func:`_import_backend`, run eagerly even when called from a step being traced."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_import_backend)(backend)
    return _import_backend(backend)


def _module(backend: str) -> tuple[Optional[object], Optional[str]]:
    """(module, None) or (None, why not): dict lookups when kdfast's import resolved the backend."""
    module = _LOADED.get(backend)
    if module is not None:
        return module, None
    reason = _LOAD_FAILURES.get(backend)
    if reason is not None:
        return None, reason
    return _import_backend_outside_graph(backend)


def _cpu_kernels_built() -> bool:
    """Whether the CPU kernels can be loaded without compiling them: the extension installed with
    the package, or one compiled for this torch in kdfast's cache."""
    if importlib.util.find_spec("kdfast._C") is not None:
        return True
    from . import _build
    csrc = _build.source_root()
    if csrc is None:
        return False
    build_dir = os.path.join(_build.cache_dir(), f"cpu-{_build._cache_key(csrc, torch.__version__)}")
    return os.path.exists(os.path.join(build_dir, "kdfast_C.so"))


def _torch_has_cuda() -> bool:
    return torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None


def _backends_to_preload() -> list[str]:
    """The backends worth importing with kdfast: those "auto" may pick on this machine, when loading
    them costs no compile (a missing CPU extension is compiled on first use, not at import)."""
    names = ["reference"]
    if _cpu_kernels_built():
        names.append("cpu")
    if _torch_has_cuda():
        if importlib.util.find_spec("triton") is not None:
            names.append("triton")
        if torch.version.cuda is not None and importlib.util.find_spec("kdfast._C_cuda") is not None:
            names.append("cuda")
    return names


def preload_backends() -> None:
    """Import the backends of :func:`_backends_to_preload` (kdfast's import does this) and report a
    fallback to the reference that is certain already."""
    for backend in _backends_to_preload():
        _import_backend(backend)
    _report_known_fallbacks()


def refresh_verification(runs: Optional[list[dict]] = None) -> None:
    """Re-read the verification record (or take ``runs``) for the choices of "auto"."""
    runs = verified.load_runs() if runs is None else runs
    _RECORDED_CAPABILITIES.clear()
    for backends in AUTO_NEEDS_RECORDED_RUN.values():
        for backend in backends:
            _RECORDED_CAPABILITIES[backend] = verified.verified_capabilities(backend, runs)


def _query_cuda_capability(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    _CUDA_CAPABILITIES[index] = f"sm_{major}{minor}"
    return _CUDA_CAPABILITIES[index]


def _cuda_capability(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _CUDA_CAPABILITIES.get(index)
    if capability is None:
        query = torch.compiler.disable(_query_cuda_capability) if torch.compiler.is_compiling() \
            else _query_cuda_capability
        capability = query(index)
    return capability


def _device_reason(device: torch.device) -> Optional[str]:
    """Why no backend can run on tensors of ``device`` in this torch, or None."""
    if device.type == "cuda":
        if not _torch_has_cuda():
            return "this torch is a CPU-only build"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


def _implementation(backend: str, loss: str, device: torch.device) -> tuple[Optional[Callable], str]:
    reason = _device_reason(device)
    if reason is not None:
        return None, reason
    module, reason = _module(backend)
    if module is None:
        return None, reason
    implementation = module.LOSSES.get(loss)
    if implementation is None:
        return None, f"it does not implement {loss}"
    check = getattr(module, "unavailable_reason", None)
    reason = check(device) if check is not None else None
    if reason is not None:
        return None, reason
    return implementation, ""


def _unverified_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why "auto" skips an available ``backend`` on ``device``: no passing recorded run on its
    hardware; None when auto may use it."""
    if backend not in AUTO_NEEDS_RECORDED_RUN.get(device.type, ()):
        return None
    capabilities = _RECORDED_CAPABILITIES.get(backend, frozenset())
    if capabilities and _cuda_capability(device) in capabilities:
        return None
    return (f"auto uses it only on hardware with a passing recorded run of the test suite "
            f"(kdfast/verified.json has one for: {', '.join(sorted(capabilities)) or 'none'}); "
            f"backend={backend!r} still runs it")


def _report_fallback(device_type: str, reasons: dict[str, str]) -> None:
    """Warn, once per device type, that "auto" runs its losses with the reference, and why. Called
    only outside traced regions (a warning cannot be traced)."""
    if device_type in _FALLBACK_REPORTED:
        return
    _FALLBACK_REPORTED.add(device_type)
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    warnings.warn(f"kdfast: backend='auto' runs the losses on {device_type} tensors with the plain-PyTorch "
                  f"reference (slower, more memory) because no fused backend can: {why}. `python -m kdfast.info` "
                  "shows the backends; pass backend='reference' to choose it.", ReferenceFallbackWarning,
                  stacklevel=4)


def _known_fallback_reasons(device_type: str) -> Optional[dict[str, str]]:
    """backend → why not, when every fused backend "auto" tries on ``device_type`` is known, without
    importing anything or querying a device, to be out of reach; else None."""
    reasons = {}
    for name in AUTO_ORDER.get(device_type, ()):
        if name == "reference":
            continue
        if name in _LOAD_FAILURES:
            reasons[name] = _LOAD_FAILURES[name]
        elif name in _LOADED and name in AUTO_NEEDS_RECORDED_RUN.get(device_type, ()) \
                and not _RECORDED_CAPABILITIES.get(name):
            reasons[name] = "auto uses it only on hardware with a passing recorded run of the test suite (none)"
        else:
            return None
    return reasons or None


def _report_known_fallbacks() -> None:
    """Report the fallbacks known once the backends are imported (at kdfast's import, or after an
    import that failed), for the device types this torch can have tensors on."""
    for device_type in ("cpu", "cuda") if _torch_has_cuda() else ("cpu",):
        reasons = _known_fallback_reasons(device_type)
        if reasons is not None:
            _report_fallback(device_type, reasons)


def _lacks_loss(backend: str, loss: str) -> bool:
    """Whether ``backend`` is loaded but does not implement ``loss`` at all (e.g. a loss only the
    reference has so far): "auto" then uses the reference without a ReferenceFallbackWarning."""
    module = _LOADED.get(backend)
    return module is not None and loss not in module.LOSSES


def _auto_candidates(device: torch.device) -> tuple[str, ...]:
    return AUTO_ORDER.get(device.type, ("reference",))


def resolve(backend: str, loss: str, device: torch.device) -> Callable:
    """The implementation of ``loss`` that ``backend`` names for tensors on ``device``."""
    if backend == "auto":
        skipped = {}
        for name in _auto_candidates(device):
            implementation, reason = _implementation(name, loss, device)
            if implementation is not None:
                reason = _unverified_reason(name, device)
            if implementation is not None and reason is None:
                if name == "reference" and skipped and not torch.compiler.is_compiling():
                    _report_fallback(device.type, skipped)
                return implementation
            if _lacks_loss(name, loss):
                continue  # a fused backend without this loss (yet) is no fallback to report
            skipped[name] = reason
        backend = "reference"
    if backend not in BACKEND_MODULES:
        choices = ", ".join(repr(name) for name in ("auto", *BACKEND_MODULES))
        raise ValueError(f"backend must be one of {choices}; got {backend!r}")
    implementation, reason = _implementation(backend, loss, device)
    if implementation is None:
        raise RuntimeError(f"backend={backend!r} is unavailable for {loss} on {device.type} tensors: {reason}")
    return implementation


def available_backends(loss: str = "kd_loss", device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run ``loss`` on ``device`` here: first those "auto" may use, in its
    order, then those that run only when named (e.g. CUDA C++ kernels with no passing recorded run
    on this GPU's compute capability)."""
    device = torch.device(device)
    order = _auto_candidates(device)
    names = list(order) + [name for name in BACKEND_MODULES if name not in order]
    runnable = [name for name in names if _implementation(name, loss, device)[0] is not None]
    chosen_by_auto = [name for name in runnable if name in order and _unverified_reason(name, device) is None]
    return chosen_by_auto + [name for name in runnable if name not in chosen_by_auto]


def backend_status(device: torch.device | str, loss: str = "kd_loss",
                   defer: Optional[dict[str, str]] = None) -> dict[str, dict]:
    """backend → {"available": bool, "reason": why not (or ""), "auto": whether "auto" may pick it
    on ``device``}, for every backend, in auto's order. ``defer`` maps backends not to import now
    (e.g. CPU kernels that would be compiled first) to the reason reported for them."""
    device = torch.device(device)
    defer = defer or {}
    order = _auto_candidates(device)
    status = {}
    for name in list(order) + [name for name in BACKEND_MODULES if name not in order]:
        if name in defer and name not in _LOADED:
            status[name] = {"available": False, "reason": _device_reason(device) or defer[name], "auto": False}
            continue
        implementation, reason = _implementation(name, loss, device)
        auto_reason = None if implementation is None else _unverified_reason(name, device)
        status[name] = {"available": implementation is not None, "reason": reason or auto_reason or "",
                        "auto": implementation is not None and name in order and auto_reason is None}
    return status


def resolve_kernel(backend: str, kernel: str, device: torch.device) -> Optional[Callable]:
    """A fused backend's raw kernel (e.g. ``"row_softmax"``, the contract of
    :mod:`kdfast.backends._fused`) for ops built on kernels rather than on whole losses, such as
    the fused-linear losses. ``None`` means "use the reference path" ("reference", or "auto" with no
    fused backend available); a named fused backend that cannot run is an error."""
    if backend == "reference":
        return None
    if backend == "auto":
        skipped = {}
        for name in _auto_candidates(device):
            if name == "reference":
                continue
            reason = _device_reason(device)
            module, load_reason = (None, reason) if reason is not None else _module(name)
            if module is not None:
                check = getattr(module, "unavailable_reason", None)
                reason = check(device) if check is not None else None
                if reason is None and not hasattr(module, kernel):
                    reason = f"it has no {kernel} kernel"
                if reason is None:
                    reason = _unverified_reason(name, device)
                if reason is None:
                    return getattr(module, kernel)
            skipped[name] = reason if module is not None else load_reason
        if skipped and not torch.compiler.is_compiling():
            _report_fallback(device.type, skipped)
        return None
    resolve(backend, "kd_loss", device)  # raises the usual clear error for an unknown or unavailable backend
    module, _ = _module(backend)
    return getattr(module, kernel)


refresh_verification()
