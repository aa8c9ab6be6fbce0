"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90 without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so lowering errors (types,
layouts, tl.dot shapes, constexpr branches) only show up here. The compile must run without
TRITON_INTERPRET=1 (conftest sets it for this process when there is no GPU), so the test runs
this file as a subprocess; ``python tests/test_triton_aot.py 90`` prints one JSON line per
kernel configuration with ptxas's register and spill counts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

TYPE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp64": "fp64"}


def _row_softmax_configs():
    """(label, signature, constexprs, num_warps) for the main modes, single-block and streamed."""
    from kdfast.backends._fused import RowSoftmaxParams, row_softmax_params
    from kdfast.backends.triton._common import STREAM_BLOCK, row_warps
    from kdfast.backends.triton.rowsoftmax import kernel_meta

    options = dict(temperature=4.0, alpha=0.5, reduction="sum", ignore_index=-100)
    modes = {
        "kd": row_softmax_params("kd_loss", **options)[0],
        "skd_layernorm": row_softmax_params("skd_loss", normalize="layernorm", multiplier=2.0, eps=1e-7, **options)[0],
        "skd_l2": row_softmax_params("skd_loss", normalize="l2", multiplier=2.0, eps=1e-7, **options)[0],
        "skd_standardize": row_softmax_params("skd_loss", normalize="standardize", multiplier=2.0, eps=1e-7,
                                              **options)[0],
        "partial_teacher": row_softmax_params("partial_teacher_loss", **options)[0],
        "label_smoothing": row_softmax_params("label_smoothing_loss", smoothing=0.1, reduction="sum",
                                              ignore_index=-100)[0],
        "reweighted_ce": row_softmax_params("reweighted_ce_loss", temperature=2.0, alpha=0.5, eps=1e-6,
                                            reduction="sum", ignore_index=-100)[0],
    }
    configs = []
    for dtype in ("bf16", "fp32"):
        for mode, params in modes.items():
            has_teacher = mode != "label_smoothing"
            for single, block in ((True, 1024), (False, STREAM_BLOCK)):
                if dtype == "fp32" and not single:
                    continue  # the streamed path's dtype handling is the bf16 one's; keep the run short
                configs.append((f"row_softmax/{mode}/{dtype}/{'single' if single else 'streamed'}",
                                _row_signature(dtype), dict(kernel_meta(params, has_teacher, True),
                                                            FP64=False, SINGLE=single, BLOCK=block, s_col=1,
                                                            t_col=1, y_stride=1, HAS_GRAD=True), row_warps(block)))
    params = RowSoftmaxParams(teacher="softmax", kl_weight=16.0, temperature=4.0)
    for dtype in ("fp16", "fp64"):
        configs.append((f"row_softmax/kd_no_target/{dtype}/single", _row_signature(dtype),
                        dict(kernel_meta(params, True, False), FP64=dtype == "fp64", SINGLE=True, BLOCK=8192,
                             s_col=1, t_col=1, y_stride=1, HAS_GRAD=True), row_warps(8192)))
    # the loss only (no_grad: no gradient pass), and a bf16 input whose gradient is kept in fp32
    params = row_softmax_params("skd_loss", temperature=4.0, multiplier=2.0, alpha=0.5, eps=1e-7,
                                normalize="layernorm", reduction="sum", ignore_index=-100)[0]
    for single, block in ((True, 1024), (False, STREAM_BLOCK)):
        configs.append((f"row_softmax/skd_loss_only/bf16/{'single' if single else 'streamed'}", _row_signature("bf16"),
                        dict(kernel_meta(params, True, True), FP64=False, SINGLE=single, BLOCK=block, s_col=1,
                             t_col=1, y_stride=1, HAS_GRAD=False), row_warps(block)))
    configs.append(("row_softmax/skd_wide_grad/fp16/single", dict(_row_signature("fp16"), GRAD="*fp32"),
                    dict(kernel_meta(params, True, True), FP64=False, SINGLE=True, BLOCK=1024, s_col=1, t_col=1,
                         y_stride=1, HAS_GRAD=True), row_warps(1024)))
    # a teacher no term reads (alpha = 0: read only for its NaNs), int32 labels with a stride, no ignore_index
    params = row_softmax_params("kd_loss", temperature=2.0, alpha=0.0, reduction="sum", ignore_index=None)[0]
    for single, block in ((True, 1024), (False, STREAM_BLOCK)):
        signature = dict(_row_signature("fp32"), Y="*i32", y_stride="i32")
        configs.append((f"row_softmax/ce_unread_teacher/fp32/{'single' if single else 'streamed'}", signature,
                        dict(kernel_meta(params, True, True), FP64=False, SINGLE=single, BLOCK=block, s_col=1,
                             t_col=1, HAS_GRAD=True), row_warps(block)))
    configs += _divergence_configs()
    return configs


def _divergence_configs():
    """divergence_loss's forms other than forward KL (its own row above is kd's): bf16 single-block
    and streamed (the extra Σπ pass), fp64 single for the softplus / sigmoid stages, one loss only."""
    from kdfast.backends._contract import DIVERGENCE_CODES
    from kdfast.backends._fused import row_softmax_params
    from kdfast.backends.triton._common import STREAM_BLOCK, row_warps
    from kdfast.backends.triton.rowsoftmax import kernel_meta

    options = dict(temperature=2.0, alpha=0.5, reduction="sum", ignore_index=-100, t2_scaling=False, beta=0.5,
                   skew_alpha=0.1, mixed_kl_weight=0.5)
    configs = []
    for divergence in DIVERGENCE_CODES:
        if divergence == "forward_kl":
            continue
        meta = kernel_meta(row_softmax_params("divergence_loss", divergence=divergence, **options)[0], True, True)
        assert meta["DIVERGENCE"] == DIVERGENCE_CODES[divergence]
        cases = [("bf16", True, 1024, True), ("bf16", False, STREAM_BLOCK, True)]
        if divergence in ("jsd", "skew_reverse_kl"):
            cases += [("fp64", True, 1024, True), ("fp32", False, STREAM_BLOCK, False)]
        for dtype, single, block, has_grad in cases:
            label = f"row_softmax/{divergence}/{dtype}/{'single' if single else 'streamed'}"
            configs.append((label + ("" if has_grad else "/loss_only"), _row_signature(dtype),
                            dict(meta, FP64=dtype == "fp64", SINGLE=single, BLOCK=block, s_col=1, t_col=1, y_stride=1,
                                 HAS_GRAD=has_grad), row_warps(block)))
    return configs


def _row_signature(dtype):
    ptr = f"*{TYPE[dtype]}"
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    signature = dict(S=ptr, T=ptr, Y="*i64", LOSS=acc, GRAD=ptr, C="i32", num_classes="fp32", s_row="i32",
                     s_col="constexpr", t_row="i32", t_col="constexpr", y_stride="constexpr", g_row="i32")
    signature.update({name: "fp32" for name in ("kappa", "eps", "inv_t", "kl_w", "ce_w", "u_w", "rw_alpha", "rw_eps")})
    signature["ignore_index"] = "i64"  # NO_IGNORE_INDEX = −2^63 when the public ignore_index is None
    signature["div_param"] = "fp32"
    for name in ("NORM", "NORM_T", "TEACHER", "HAS_CE", "HAS_UNIFORM", "REWEIGHT", "HAS_TARGET", "HAS_TEACHER",
                 "FP64", "SINGLE", "BLOCK", "HAS_GRAD", "DIVERGENCE"):
        signature[name] = "constexpr"
    return signature


def _nd_configs():
    configs = []
    for dtype, single, block in (("bf16", True, 2048), ("fp32", True, 512), ("fp16", False, 4096),
                                 ("fp64", True, 512)):
        ptr = f"*{TYPE[dtype]}"
        signature = dict(U=ptr, FT=ptr, Y="*i64", CEN=ptr, LOSS="*fp64" if dtype == "fp64" else "*fp32", GRAD=ptr,
                         D="i32", num_centres="i32", u_row="i32", u_col="constexpr", t_row="i32", t_col="constexpr",
                         y_stride="constexpr", c_row="i32", c_col="constexpr", g_row="i32", eps="fp32",
                         ignore_index="i64", FP64="constexpr", SINGLE="constexpr", BLOCK="constexpr",
                         HAS_GRAD="constexpr")
        for has_grad in (True, False) if dtype == "bf16" else (True,):
            configs.append((f"nd/{dtype}/{'single' if single else 'streamed'}{'' if has_grad else '/loss_only'}",
                            signature, dict(u_col=1, t_col=1, y_stride=1, c_col=1, FP64=dtype == "fp64",
                                            SINGLE=single, BLOCK=block, HAS_GRAD=has_grad), 4))
    return configs


def _gram_configs():
    import torch

    from kdfast.backends._contract import GRAM_KIND_CODES
    from kdfast.backends.triton.landmark_gram import gram_warps, launch_config
    configs = []
    for dtype, kind, m, fused_limit in (("bf16", "smooth_l1", 100, 256), ("fp32", "smooth_l1", 100, 256),
                                        ("fp16", "sq_fro", 1000, 256), ("fp32", "sq_fro", 1000, 256),
                                        ("fp64", "smooth_l1", 100, 256), ("fp64", "sq_fro", 1000, 256)):
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                       "fp64": torch.float64}[dtype]
        meta = launch_config(torch_dtype, m, fused_limit)
        ptr = f"*{TYPE[dtype]}"
        acc = "*fp64" if dtype == "fp64" else "*fp32"
        signature = dict(FS=ptr, CS=ptr, ST=acc, SCALE=acc, LOSS=acc, GRAD=ptr, GSCRATCH=acc, B="i32", M="i32",
                         DS="i32", fs_row="i32", fs_col="constexpr", cs_row="i32", cs_col="constexpr", st_row="i32",
                         g_row="i32", gs_row="i32", beta="fp32")
        signature.update({name: "constexpr" for name in ("KIND", "HAS_GRAD", *meta)})
        label = f"gram/{kind}/{dtype}/m{m}/{'fused' if meta['FUSED_GRAD'] else 'scratch'}"
        configs.append((label, signature, dict(meta, KIND=GRAM_KIND_CODES[kind], HAS_GRAD=True, fs_col=1, cs_col=1),
                        gram_warps(meta["BLOCK_M"])))
        if dtype == "bf16":
            configs.append((label + "/loss_only", signature,
                            dict(meta, KIND=GRAM_KIND_CODES[kind], HAS_GRAD=False, fs_col=1, cs_col=1),
                            gram_warps(meta["BLOCK_M"])))
        if not meta["FUSED_GRAD"]:
            grad_signature = dict(G=acc, CS=ptr, GRAD=ptr, B="i32", M="i32", DS="i32", g_row="i32", cs_row="i32",
                                  cs_col="constexpr", out_row="i32", GRAD_PRECISION="constexpr", BLOCK_B="constexpr",
                                  BLOCK_M="constexpr", BLOCK_D="constexpr")
            configs.append((f"gram_grad/{dtype}", grad_signature,
                            dict(cs_col=1, GRAD_PRECISION=meta["GRAD_PRECISION"], BLOCK_B=meta["BLOCK_B"],
                                 BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"]), 4))
    return configs


def _ptxas_resources(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from the ptxas bundled with triton (-v)."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch == 90 else f"--gpu-name=sm_{arch}",
                                 source, "-o", os.path.join(folder, "kernel.cubin")], capture_output=True, text=True)
    report = result.stderr
    registers = spills = None
    for line in report.splitlines():
        if "registers" in line:
            registers = int(line.split("Used")[1].split("registers")[0])
        if "spill stores" in line:
            spills = int(line.split("bytes spill stores")[0].split()[-1])
    return dict(registers=registers, spill_store_bytes=spills)


def compile_all(arch: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib
    # import_module: the package re-exports functions under the same names as the submodules
    rowsoftmax, feature_centre, landmark_gram = (importlib.import_module(f"kdfast.backends.triton.{name}")
                                                 for name in ("rowsoftmax", "feature_centre", "landmark_gram"))
    kernels = {"row_softmax": rowsoftmax._row_softmax_kernel, "nd": feature_centre._nd_kernel,
               "gram": landmark_gram._gram_kernel, "gram_grad": landmark_gram._gram_grad_kernel}
    results = []
    for label, signature, constexprs, warps in _row_softmax_configs() + _nd_configs() + _gram_configs():
        kernel = kernels[label.split("/")[0]]
        start = time.perf_counter()
        entry = dict(arch=arch, config=label)
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
            entry.update(ok=True, **_ptxas_resources(compiled.asm["ptx"], arch))
        except Exception as error:  # reported, and failed by the test
            entry.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
        entry["seconds"] = round(time.perf_counter() - start, 2)
        results.append(entry)
        print(json.dumps(entry), flush=True)
    return results


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_ahead_of_time(arch):
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    process = subprocess.run([sys.executable, __file__, str(arch)], capture_output=True, text=True, env=environment,
                             timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    assert process.returncode == 0, process.stderr[-4000:]
    assert lines, process.stderr[-4000:]
    failures = [line for line in lines if not line["ok"]]
    assert not failures, json.dumps(failures, indent=1)
    spilled = [line["config"] for line in lines if line.get("spill_store_bytes")]
    assert len(lines) == len(_row_softmax_configs()) + len(_nd_configs()) + len(_gram_configs())
    if spilled:
        print("register spills in:", spilled)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
