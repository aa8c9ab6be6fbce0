"""Feature–centre family: the ND loss on features [B, d] with C = 1000 class centres."""
from __future__ import annotations

import torch

import kdfast
from kdfast import reference

from .family import Family, Kernel

CLASSES = 1000


def _make_inputs(shape: dict, dtype: torch.dtype, device: torch.device):
    rows, dim, classes = shape["B"], shape["d"], shape["C"]
    student = torch.randn(rows, dim, device=device).to(dtype).requires_grad_()
    teacher = torch.randn(rows, dim, device=device).to(dtype)
    target = torch.randint(classes, (rows,), device=device)
    centers = torch.randn(classes, dim, device=device).to(dtype)
    return (student, teacher, target, centers), [student]


FAMILY = Family(
    name="feature-centre",
    x_name="B*d",
    dims=("B", "d"),
    fixed={"C": CLASSES},
    kernels=(Kernel("nd_loss", "nd_loss", reference.nd_loss, kdfast.nd_loss),),
    sizes={
        "tiny": [(8, 16), (16, 32)],
        "quick": [(256, 512), (2048, 2048)],
        "targets": [(512, 2048)],
        "targets-gpu": [(512, 2048)],  # --targets on a CUDA device: the same shape
        "default": [(128, 512), (256, 2048), (512, 2048), (1024, 2048), (4096, 2048), (4096, 4096)],
    },
    make_inputs=_make_inputs,
    x_value=lambda shape: shape["B"] * shape["d"],
    work=lambda shape: shape["B"] * shape["d"],
    small_work=1e6,
    unit_bytes=lambda shape, itemsize: (shape["B"] + shape["C"]) * shape["d"] * itemsize,
    memory_factor={"eager": 8.0, "compile": 6.0, "fused": 5.0, "liger": 8.0},
)
