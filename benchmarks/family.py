"""What a family module declares: its kernels (public losses), shapes, inputs and size measures.

A *kernel* row in the results is one public loss with fixed options (e.g. ``skd_loss`` with
``normalize="layernorm"``); its baselines are the functions of :mod:`kdfast.reference` that the
tests use, so the two cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Kernel:
    name: str                                  # label in the results (the loss, plus a variant)
    loss: str                                  # the public loss name, as kdfast's dispatcher knows it
    reference: Callable                        # kdfast.reference.<loss>: the eager baseline
    public: Callable                           # kdfast.<loss>: called with backend=<fused backend>
    options: dict = field(default_factory=dict)
    #: builds Liger-Kernel's equivalent of the loss (same positional inputs), or None if none applies
    liger: Optional[Callable[[dict], Callable]] = None


@dataclass(frozen=True)
class Family:
    name: str
    x_name: str                                # what the x axis of the plots counts
    dims: tuple[str, ...]                      # the shape's named dimensions, in order
    kernels: tuple[Kernel, ...]
    sizes: dict                                # sweep name → list of shape tuples (see ``dims``)
    make_inputs: Callable[[dict, torch.dtype, torch.device], tuple[tuple, list]]
    x_value: Callable[[dict], float]
    #: size in the unit of ``small_work``: below it, the shape runs with 1 thread
    work: Callable[[dict], float]
    small_work: float
    #: bytes of the family's main tensor(s); peak memory estimates are multiples of it
    unit_bytes: Callable[[dict, int], int]
    #: provider kind → (kernel name → multiple of unit_bytes, or a default for every kernel): a
    #: conservative peak estimate used before anything was measured for the kernel and provider
    memory_factor: dict
    fixed: dict = field(default_factory=dict)  # dimensions held constant in every sweep (e.g. C)
    scaling: dict = field(default_factory=dict)

    def shape(self, values: tuple) -> dict:
        return {**dict(zip(self.dims, values)), **self.fixed}

    @staticmethod
    def describe(shape: dict) -> str:
        return " ".join(f"{key}={value}" for key, value in shape.items())

    def factor(self, kind: str, kernel: str) -> float:
        value = self.memory_factor[kind]
        return value.get(kernel, value.get("*", 8.0)) if isinstance(value, dict) else value
