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


def _cuda_include_dir():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    for root in (pathlib.Path(nvcc).resolve().parent.parent, pathlib.Path("/usr/local/cuda")):
        if (root / "include" / "cuda_runtime.h").exists():
            return root / "include"
    return None


@pytest.mark.skipif(_cuda_include_dir() is None, reason="no CUDA toolkit headers (nvcc) here")
def test_cuda_glue_compiles_against_this_torch(tmp_path):
    """csrc/cuda/glue.cpp (the torch side of the CUDA extension) is only built against a CUDA torch;
    its C++ is checked here against the installed torch's headers, which ship c10/cuda too — all but
    the one header a CUDA build generates, c10/cuda/impl/cuda_cmake_macros.h, written here as a CUDA
    wheel has it."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    import torch
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    command = [compiler, "-fsyntax-only", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[f"-I{path}" for path in include_paths()], f"-I{tmp_path}", f"-I{_cuda_include_dir()}",
               f"-I{sysconfig.get_paths()['include']}", f"-I{CUDA_DIR.parent}", str(CUDA_DIR / "glue.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    assert result.returncode == 0, f"glue.cpp does not compile:\n{result.stderr[-4000:]}"
