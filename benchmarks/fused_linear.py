"""Fused-linear family: KD and SKD on output projections, hidden [N, H] × weight [V, H] for both
networks (issue 6), against the materialised path — full logits, then the reference loss —
eager and under torch.compile. Gradients flow to the student's hidden states and weight."""
from __future__ import annotations

import torch

import kdfast
from kdfast import reference

from .family import Family, Kernel


def _materialised(loss):
    """The reference: both logit matrices in memory, then the reference loss on them."""
    def run(student_hidden, student_weight, teacher_hidden, teacher_weight, **options):
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        return loss(student_hidden @ student_weight.T, teacher_logits, **options)
    run.__name__ = f"materialised_{loss.__name__}"
    return run


def _make_inputs(shape: dict, dtype: torch.dtype, device: torch.device):
    rows, hidden, vocab = shape["N"], shape["H"], shape["V"]
    student_hidden = torch.randn(rows, hidden, device=device).to(dtype).requires_grad_()
    student_weight = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
    teacher_hidden = torch.randn(rows, hidden, device=device).to(dtype)
    teacher_weight = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype)
    return (student_hidden, student_weight, teacher_hidden, teacher_weight), [student_hidden, student_weight]


FAMILY = Family(
    name="fused-linear",
    x_name="N*V",
    dims=("N", "H", "V"),
    kernels=(
        Kernel("fused_linear_kd_loss", "kd_loss", _materialised(reference.kd_loss), kdfast.fused_linear_kd_loss,
               dict(temperature=4.0)),
        Kernel("fused_linear_skd_loss", "skd_loss", _materialised(reference.skd_loss), kdfast.fused_linear_skd_loss,
               dict(temperature=4.0, multiplier=2.0)),
    ),
    sizes={
        "tiny": [(8, 16, 64)],
        "quick": [(512, 256, 4096)],
        "targets": [(4096, 1024, 32000)],
        # --targets on a CUDA device (issue 13): a Llama-3-8B-sized head, BT=8192 H=4096 V=128256, bf16
        "targets-gpu": [(8192, 4096, 128256)],
        "default": [(1024, 256, 8192), (4096, 1024, 32000)],
    },
    make_inputs=_make_inputs,
    x_value=lambda shape: shape["N"] * shape["V"],
    # multiply-adds of one projection
    work=lambda shape: shape["N"] * shape["H"] * shape["V"],
    small_work=5e7,
    unit_bytes=lambda shape, itemsize: shape["N"] * shape["V"] * itemsize,
    memory_factor={"eager": {"fused_linear_kd_loss": 11.0, "*": 15.0}, "compile": 9.0, "fused": 2.0, "liger": 10.0},
)
