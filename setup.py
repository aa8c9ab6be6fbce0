"""kdfast packaging. Install with ``pip install --no-build-isolation -e .`` after
``pip install torch==2.13.0`` (see README): the runtime requirement on torch is a range that the
pinned CPU wheel satisfies, so pip adds nothing and never pulls the CUDA wheels.

Compiled parts (built against the installed torch, hence --no-build-isolation):

* ``kdfast._C`` (always): the CPU kernels of the three families and the ``torch.ops.kdfast`` schemas.
  - ``csrc/bindings.cpp``, ``csrc/cpu/glue.cpp``, ``csrc/cpu/landmark_gram.cpp``: Tensor code,
    compiled once with torch's default flags (-O3, C++20).
  - ``csrc/cpu/rowsoftmax.cpp``, ``csrc/cpu/feature_centre.cpp``: the hot loops, compiled three times
    into objects linked side by side, one per instruction set, each in its own namespace
    (``-DCPU_CAPABILITY=<name>``) so ATen's ``at::vec`` picks the matching SIMD code:
      AVX512:  -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma   (16 floats per vector)
      AVX2:    -mavx2 -mfma -mf16c                                  (8 floats per vector)
      DEFAULT: no ISA flag (portable fallback)
    csrc/cpu/glue.cpp chooses one at run time with ``__builtin_cpu_supports``. ``-march=native`` is
    never used: a wheel or a shared build directory must run on any x86-64 CPU.
* ``kdfast._C_cuda`` (only when ``torch.version.cuda`` is set and nvcc is found): the CUDA kernels
  (``csrc/cuda/*.cu``, CUDA headers only) and their torch glue (``csrc/cuda/glue.cpp``).

``KDFAST_NO_EXTENSION=1`` skips the compiled parts (the package then runs on the reference).
"""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"

#: instruction-set builds of the hot kernel sources: name → extra compiler flags
CPU_CAPABILITIES = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
CAPABILITY_SOURCES = ["csrc/cpu/rowsoftmax.cpp", "csrc/cpu/feature_centre.cpp"]
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/cpu/glue.cpp", "csrc/cpu/landmark_gram.cpp"]
CUDA_SOURCES = ["csrc/cuda/rowsoftmax.cu", "csrc/cuda/feature_centre.cu", "csrc/cuda/landmark_gram.cu",
                "csrc/cuda/glue.cpp"]
#: flags every C++ TU gets (torch's own extension flags add -std=c++20 and the ABI define);
#: -fno-math-errno lets std::sqrt/std::exp compile to instructions instead of errno-setting calls
CXX_FLAGS = ["-O3", "-fno-math-errno"]
#: the Tensor glue calls at::parallel_for, whose OpenMP body ATen compiles inline into *this* TU:
#: without -fopenmp it silently runs on one thread (measured: the KD kernel took as long with 2
#: threads as with 1). Linking needs no -lgomp of its own: the libgomp.so.1 that torch loads first
#: (bundled in torch/lib) provides the symbols, so the process keeps a single OpenMP runtime.
OPENMP_FLAGS = ["-fopenmp"]
#: CUDA architectures compiled into the CUDA extension: Ampere and Hopper, plus PTX for newer GPUs
NVCC_FLAGS = ["-O3", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
              "-gencode", "arch=compute_90,code=compute_90"]


def _extensions():
    if os.environ.get("KDFAST_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, include_paths

    class BuildWithCapabilities(BuildExtension):
        """BuildExtension plus the per-instruction-set objects of CAPABILITY_SOURCES (setuptools has
        no per-source flags, so they are compiled here and linked in as extra objects)."""

        def build_extensions(self):
            for extension in self.extensions:
                sources = getattr(extension, "capability_sources", None)
                if sources:
                    extension.extra_objects = list(extension.extra_objects or []) + self._capability_objects(sources)
            super().build_extensions()

        def _capability_objects(self, sources):
            compiler = os.environ.get("CXX", "c++")
            abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
            common = ["-c", "-fPIC", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *CXX_FLAGS,
                      *[f"-I{path}" for path in include_paths()], f"-I{os.path.join(ROOT, CSRC)}"]
            headers = [os.path.join(ROOT, "csrc", name) for name in ("cpu/kernels.h", "cpu/vec_helpers.h",
                                                                    "common/contract.h", "common/row_math.h")]
            jobs = []
            for name, flags in CPU_CAPABILITIES.items():
                for source in sources:
                    stem = os.path.splitext(os.path.basename(source))[0]
                    obj = os.path.join(ROOT, self.build_temp, "capabilities", f"{stem}.{name.lower()}.o")
                    jobs.append((obj, [compiler, os.path.join(ROOT, source), "-o", obj, *common,
                                       f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}", *flags],
                                 [os.path.join(ROOT, source), *headers]))

            def compile_one(job):
                obj, command, inputs = job
                if os.path.exists(obj) and all(os.path.getmtime(obj) >= os.path.getmtime(p) for p in inputs):
                    return obj
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                print(" ".join(command), flush=True)
                subprocess.run(command, check=True)
                return obj

            workers = max(1, min(len(jobs), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(compile_one, jobs))

    cpu = CppExtension("kdfast._C", CPU_SOURCES, include_dirs=[os.path.join(ROOT, CSRC)],
                       extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS})
    cpu.capability_sources = CAPABILITY_SOURCES
    extensions = [cpu]
    if torch.version.cuda and shutil.which("nvcc"):
        extensions.append(CUDAExtension("kdfast._C_cuda", CUDA_SOURCES, include_dirs=[os.path.join(ROOT, CSRC)],
                                        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}))
    return extensions, {"build_ext": BuildWithCapabilities.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="kdfast",
    version="0.1.0",
    description="Fused, memory-lean knowledge-distillation losses (KD, SKD, ND, KDA/Nystrom, Tang et al., L2RKD)",
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "tqdm"],
    extras_require={"test": ["pytest", "hypothesis", "numpy"], "bench": ["matplotlib", "numpy"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
