"""The providers timed for a kernel on a device, discovered at run time so the suite follows the
backends that exist when it runs (today the reference; later kdfast's "cpu", "triton", "cuda").

* ``eager``   — the kdfast.reference function, plain PyTorch.
* ``compile`` — ``torch.compile`` of that same function (static shapes, one compile per shape).
* ``kdfast-<backend>`` — every fused backend ``kdfast.available_backends`` lists for the loss on
  the device, except "reference", called through the public API with ``backend=<backend>``.
* ``kdfast-cpu-reuse`` — the cpu backend with its opt-in gradient-block reuse switched on for its
  own calls (row-softmax losses); the blocks it keeps between steps count in its peak memory.
* ``liger``   — Liger-Kernel where the kernel has an equivalent, on CUDA, when installed.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import kdfast

from .family import Kernel

FUSED_PREFIX = "kdfast-"
#: the row-softmax losses, whose cpu gradients come from the reusable blocks (csrc/cpu/glue.cpp)
REUSABLE_GRADIENT_LOSSES = {"kd_loss", "skd_loss", "partial_teacher_loss", "label_smoothing_loss",
                            "reweighted_ce_loss"}


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str                       # "eager" | "compile" | "fused" | "liger"
    build: Callable[[], Callable]   # → loss(*inputs); called once per (kernel, shape)
    held_bytes: Optional[Callable[[], int]] = None  # memory it keeps between steps, outside any one step

    @property
    def fused(self) -> bool:
        return self.kind == "fused"


def _eager(kernel: Kernel) -> Callable:
    reference, options = kernel.reference, kernel.options

    def loss(*inputs):
        return reference(*inputs, **options)
    return loss


def _compiled(kernel: Kernel) -> Callable:
    # A fresh dynamo state per shape: each shape gets its own static-shape graph, and graphs of
    # earlier shapes (and their memory) are dropped instead of piling up to the recompile limit.
    torch._dynamo.reset()
    return torch.compile(_eager(kernel), dynamic=False)


def _fused(kernel: Kernel, backend: str) -> Callable:
    public, options = kernel.public, kernel.options

    def loss(*inputs):
        return public(*inputs, backend=backend, **options)
    return loss


def _fused_reusing_gradients(kernel: Kernel) -> Callable:
    from kdfast.backends import cpu
    cpu.release_kept_gradients()  # every (kernel, shape) starts like a training loop's first step
    fused = _fused(kernel, "cpu")

    def loss(*inputs):
        with cpu.gradient_reuse():
            return fused(*inputs)
    return loss


def _kept_gradient_bytes() -> int:
    from kdfast.backends import cpu
    return cpu.kept_gradient_bytes()


def _interpreted(backend: str, device: torch.device) -> bool:
    """Triton kernels on CPU tensors run in the interpreter (numpy, one program at a time):
    correct, but its timings say nothing about the kernels."""
    return backend == "triton" and device.type == "cpu"


def providers_for(kernel: Kernel, device: torch.device, *, compile_: bool, notes: list[str]) -> list[Provider]:
    """The providers to run ``kernel`` with on ``device``; why any is left out goes to ``notes``."""
    found = [Provider("eager", "eager", lambda: _eager(kernel))]
    if compile_:
        found.append(Provider("compile", "compile", lambda: _compiled(kernel)))
    for backend in kdfast.available_backends(kernel.loss, device):
        if backend == "reference":
            continue
        if _interpreted(backend, device):
            notes.append(f"{kernel.name}: kdfast backend 'triton' skipped on CPU (Triton interpreter"
                         f"{', TRITON_INTERPRET=1' if os.environ.get('TRITON_INTERPRET') else ''}: not a timing)")
            continue
        found.append(Provider(FUSED_PREFIX + backend, "fused", lambda backend=backend: _fused(kernel, backend)))
        if backend == "cpu" and kernel.loss in REUSABLE_GRADIENT_LOSSES:
            found.append(Provider(FUSED_PREFIX + "cpu-reuse", "fused", lambda: _fused_reusing_gradients(kernel),
                                  held_bytes=_kept_gradient_bytes))
    if kernel.liger is not None:
        if device.type != "cuda":
            notes.append(f"{kernel.name}: Liger-Kernel skipped (its kernels are Triton on CUDA; device is {device.type})")
        elif importlib.util.find_spec("liger_kernel") is None:
            notes.append(f"{kernel.name}: Liger-Kernel skipped (liger_kernel is not installed)")
        else:
            found.append(Provider("liger", "liger", lambda: kernel.liger(kernel.options)))
    return found
