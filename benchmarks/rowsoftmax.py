"""Row-softmax family: KD and SKD (layernorm) on logits [N, V].

Pure distillation (alpha = 1, no labels), T = 4, reduction ``batchmean``: the setting where
Liger-Kernel's element-wise KL applies, so it can sit in the same table on GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference

from .family import Family, Kernel


def _liger_kd(options: dict):
    """KD as Liger users write it: log-softmax of both sides at T, then LigerKLDIVLoss, times T²."""
    from liger_kernel.transformers import LigerKLDIVLoss
    temperature = options["temperature"]
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(student, teacher):
        return temperature**2 * kl(F.log_softmax(student.float() / temperature, dim=-1),
                                   F.log_softmax(teacher.detach().float() / temperature, dim=-1))
    return loss


def _make_inputs(shape: dict, dtype: torch.dtype, device: torch.device):
    student = torch.randn(shape["N"], shape["V"], device=device).to(dtype).requires_grad_()
    teacher = torch.randn(shape["N"], shape["V"], device=device).to(dtype)
    return (student, teacher), [student]


FAMILY = Family(
    name="row-softmax",
    x_name="N*V",
    dims=("N", "V"),
    kernels=(
        Kernel("kd_loss", "kd_loss", reference.kd_loss, kdfast.kd_loss, dict(temperature=4.0), liger=_liger_kd),
        Kernel("skd_loss[layernorm]", "skd_loss", reference.skd_loss, kdfast.skd_loss,
               dict(temperature=4.0, multiplier=2.0, normalize="layernorm")),
    ),
    sizes={
        "tiny": [(8, 64), (16, 256)],
        "quick": [(256, 100), (1024, 1000), (1024, 8192)],
        "targets": [(4096, 32000)],
        # --targets on a CUDA device (issue 13): the LLM vocabularies at 8192 rows, run in bf16
        "targets-gpu": [(8192, 32000), (8192, 128256)],
        "default": [(256, 100), (1024, 1000), (4096, 4096), (4096, 32000), (8192, 32000), (2048, 128256),
                    (8192, 128256)],
    },
    make_inputs=_make_inputs,
    x_value=lambda shape: shape["N"] * shape["V"],
    work=lambda shape: shape["N"] * shape["V"],
    small_work=1e6,
    unit_bytes=lambda shape, itemsize: shape["N"] * shape["V"] * itemsize,
    # measured on CPU fp32 (inputs included): eager KD ≈ 8.3, SKD ≈ 11–13 N×V tensors
    memory_factor={"eager": {"kd_loss": 10.0, "*": 14.0}, "compile": 8.0, "fused": 5.0, "liger": 10.0},
    scaling={
        "tiny": [("N", (8, 16), {"V": 64}), ("V", (64, 128), {"N": 8})],
        # (dimension swept, values, the other dimension held fixed)
        "quick": [("N", (256, 512, 1024, 2048, 4096), {"V": 4096}),
                  ("V", (1000, 2000, 4000, 8000, 16000, 32000), {"N": 256})],
        "default": [("N", (256, 512, 1024, 2048, 4096, 8192), {"V": 32000}),
                    ("V", (1000, 2000, 4000, 8000, 16000, 32000, 64000, 128256), {"N": 1024})],
    },
)
