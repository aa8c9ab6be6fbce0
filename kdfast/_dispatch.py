"""The one place that chooses a backend.

A backend is a module exposing ``LOSSES`` (public loss name → implementation taking checked 2-D
tensors and the same keywords as the reference) and, optionally, ``unavailable_reason(device)``
returning ``None`` when it can run on that device or a sentence saying why not.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional

import torch

#: backend name → module implementing it (compiled or JIT kernels are imported only when asked for)
BACKEND_MODULES = {
    "reference": "kdfast.reference",
    "cpu": "kdfast.backends.cpu",
    "triton": "kdfast.backends.triton",
    "cuda": "kdfast.backends.cuda",
}

#: what "auto" tries, fastest first, per device type; the reference runs everywhere
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


_LOAD_FAILURES: dict[str, str] = {}


def _load(backend: str):
    """(module, None) or (None, why it cannot be loaded). A loaded module is read from sys.modules,
    which torch.compile can trace; importing happens once, outside compiled regions in practice."""
    name = BACKEND_MODULES[backend]
    module = sys.modules.get(name)
    if module is not None:
        return module, None
    if backend in _LOAD_FAILURES:
        return None, _LOAD_FAILURES[backend]
    try:
        return importlib.import_module(name), None
    except ImportError as error:  # not built, or its toolchain (triton, the extension) missing
        _LOAD_FAILURES[backend] = f"it is not installed or not built here ({error})"
        return None, _LOAD_FAILURES[backend]


def _implementation(backend: str, loss: str, device: torch.device) -> tuple[Optional[Callable], str]:
    module, reason = _load(backend)
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


def resolve(backend: str, loss: str, device: torch.device) -> Callable:
    """The implementation of ``loss`` that ``backend`` names for tensors on ``device``."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            implementation, _ = _implementation(name, loss, device)
            if implementation is not None:
                return implementation
        backend = "reference"
    if backend not in BACKEND_MODULES:
        choices = ", ".join(repr(name) for name in ("auto", *BACKEND_MODULES))
        raise ValueError(f"backend must be one of {choices}; got {backend!r}")
    implementation, reason = _implementation(backend, loss, device)
    if implementation is None:
        raise RuntimeError(f"backend={backend!r} is unavailable for {loss} on {device.type} tensors: {reason}")
    return implementation


def available_backends(loss: str = "kd_loss", device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run ``loss`` on ``device`` here, in the order "auto" prefers them."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("reference",))
    names = list(order) + [name for name in BACKEND_MODULES if name not in order]
    return [name for name in names if _implementation(name, loss, device)[0] is not None]


def resolve_kernel(backend: str, kernel: str, device: torch.device) -> Optional[Callable]:
    """A fused backend's raw kernel (e.g. ``"row_softmax"``, the contract of
    :mod:`kdfast.backends._fused`) for ops built on kernels rather than on whole losses, such as
    the fused-linear losses. ``None`` means "use the reference path" ("reference", or "auto" with no
    fused backend available); a named fused backend that cannot run is an error."""
    if backend == "reference":
        return None
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ()):
            if name == "reference":
                continue
            module, _ = _load(name)
            check = getattr(module, "unavailable_reason", None) if module is not None else None
            if module is not None and hasattr(module, kernel) and (check is None or check(device) is None):
                return getattr(module, kernel)
        return None
    resolve(backend, "kd_loss", device)  # raises the usual clear error for an unknown or unavailable backend
    module, _ = _load(backend)
    return getattr(module, kernel)
