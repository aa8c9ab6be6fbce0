"""Landmark-Gram family: the KDA / Nyström loss, features [B, d] against m landmarks per network
(student and teacher dimensions equal here), smooth-L1, normalised, summed — the KDA defaults."""
from __future__ import annotations

import torch

import kdfast
from kdfast import reference

from .family import Family, Kernel


def _make_inputs(shape: dict, dtype: torch.dtype, device: torch.device):
    rows, dim, landmarks = shape["B"], shape["d"], shape["m"]
    student = torch.randn(rows, dim, device=device).to(dtype).requires_grad_()
    teacher = torch.randn(rows, dim, device=device).to(dtype)
    student_landmarks = torch.randn(landmarks, dim, device=device).to(dtype)
    teacher_landmarks = torch.randn(landmarks, dim, device=device).to(dtype)
    return (student, teacher, student_landmarks, teacher_landmarks), [student]


FAMILY = Family(
    name="landmark-gram",
    x_name="B*d*m",
    dims=("B", "d", "m"),
    kernels=(Kernel("nystrom_loss", "nystrom_loss", reference.nystrom_loss, kdfast.nystrom_loss),),
    sizes={
        "tiny": [(8, 16, 4), (16, 32, 8)],
        "quick": [(128, 512, 100), (512, 2048, 1000)],
        "targets": [(1024, 2048, 100)],
        "targets-gpu": [(1024, 2048, 100)],  # --targets on a CUDA device: the same shape
        "default": [(128, 512, 100), (256, 2048, 100), (1024, 512, 100), (1024, 2048, 100), (1024, 2048, 1000),
                    (4096, 4096, 1000)],
    },
    make_inputs=_make_inputs,
    x_value=lambda shape: shape["B"] * shape["d"] * shape["m"],
    # multiply-adds of the two GEMMs; a GEMM of ~5e7 of them is well under a millisecond
    work=lambda shape: shape["B"] * shape["d"] * shape["m"],
    small_work=5e7,
    unit_bytes=lambda shape, itemsize: (2 * shape["B"] * shape["d"] + 2 * shape["m"] * shape["d"]
                                        + shape["B"] * shape["m"]) * itemsize,
    memory_factor={"eager": 6.0, "compile": 5.0, "fused": 4.0, "liger": 6.0},
)
