"""Every CUDA kernel source compiles for Ampere (sm_80) and Hopper (sm_90).

No GPU is needed: nvcc only compiles. The .cu files use CUDA headers only (no torch), so this runs
on the CPU-only machines too, wherever nvcc is installed."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

CUDA_DIR = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
#: the architectures setup.py builds for
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
#: seconds per file; a normal compile takes a few
COMPILE_TIMEOUT = 300


def test_cuda_sources_exist():
    names = {path.stem for path in SOURCES}
    assert {"rowsoftmax", "feature_centre", "landmark_gram"} <= names, names


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles(source, tmp_path):
    result = subprocess.run(
        ["nvcc", "-c", "-std=c++17", *ARCH_FLAGS, "-Xptxas", "-v", str(source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr[-4000:]}"
    assert (tmp_path / "kernel.o").stat().st_size > 0
    # a kernel that spills registers to local memory is a performance defect worth seeing
    spills = [int(count) for count in re.findall(r"(\d+) bytes spill stores", result.stderr)]
    assert spills, "ptxas -v reported no kernels"
    assert max(spills) == 0, f"register spills in {source.name}:\n{result.stderr[-4000:]}"
