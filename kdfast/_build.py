"""How kdfast's compiled CPU kernels are built: one recipe for ``setup.py`` (at install time, when
torch is importable in the build environment) and for the first use of a package installed without
them (``pip install .`` in an isolated build environment has no torch): then the kernels are
compiled once for the torch installed beside kdfast and cached under ``$KDFAST_CACHE_DIR`` (default
``~/.cache/kdfast``), keyed by the torch version, the kdfast version, the compiler and the sources.

The extension ``kdfast._C`` is ``csrc/bindings.cpp``, ``csrc/cpu/glue.cpp`` and
``csrc/cpu/landmark_gram.cpp`` (Tensor code, torch's default flags) plus the hot loops
``csrc/cpu/rowsoftmax.cpp`` and ``csrc/cpu/feature_centre.cpp`` compiled once per instruction set
into objects linked side by side (``-DCPU_CAPABILITY=<name>`` puts each in its own namespace, and
``csrc/cpu/glue.cpp`` picks one at run time; ``-march=native`` is never used, so a build runs on any
x86-64 CPU).

No torch or kdfast import at module level: ``setup.py`` loads this file by its path.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

#: instruction-set builds of the hot kernel sources: name → extra compiler flags
CPU_CAPABILITIES = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
#: sources relative to the csrc folder
CAPABILITY_SOURCES = ["cpu/rowsoftmax.cpp", "cpu/feature_centre.cpp"]
CPU_SOURCES = ["bindings.cpp", "cpu/glue.cpp", "cpu/landmark_gram.cpp"]
CUDA_SOURCES = ["cuda/rowsoftmax.cu", "cuda/feature_centre.cu", "cuda/landmark_gram.cu", "cuda/glue.cpp"]
#: -fno-math-errno lets std::sqrt/std::exp compile to instructions instead of errno-setting calls
CXX_FLAGS = ["-O3", "-fno-math-errno"]
#: the Tensor glue calls at::parallel_for, whose OpenMP body ATen compiles inline into *that* TU:
#: without -fopenmp it silently runs on one thread. No -lgomp of our own: torch's libgomp serves.
OPENMP_FLAGS = ["-fopenmp"]
#: CUDA architectures of the CUDA extension: Ampere and Hopper by default (KDFAST_CUDA_ARCHS=90 builds
#: one, e.g. for a quick check on an H100), plus PTX of the newest for later GPUs
CUDA_ARCHS = [arch for arch in os.environ.get("KDFAST_CUDA_ARCHS", "80,90").split(",") if arch.strip()]
NVCC_FLAGS = ["-O3", *[flag for arch in CUDA_ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")],
              "-gencode", f"arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]
#: what the kernel sources include besides themselves (rebuild when one changes)
HEADER_SUFFIXES = (".h", ".cuh")

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def source_root() -> Optional[str]:
    """The csrc folder: shipped inside the package (``kdfast/_csrc``, in wheels and installs from an
    sdist) or beside it (a source checkout, an editable install); None if neither exists."""
    for candidate in (os.path.join(PACKAGE_DIR, "_csrc"), os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(candidate, "bindings.cpp")):
            return candidate
    return None


def all_sources(csrc: str) -> list[str]:
    """Every kernel source and header under csrc (sorted, absolute)."""
    found = []
    for folder, _, names in os.walk(csrc):
        found += [os.path.join(folder, name) for name in names
                  if name.endswith((".cpp", ".cu") + HEADER_SUFFIXES)]
    return sorted(found)


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def capability_objects(csrc: str, build_dir: str, include_dirs: list[str], abi: int,
                       progress: Optional[Callable[[str], None]] = None) -> list[str]:
    """Compile CAPABILITY_SOURCES once per instruction set into build_dir (objects up to date with
    every source and header are kept) and return the object paths."""
    common = ["-c", "-fPIC", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *CXX_FLAGS,
              *[f"-I{path}" for path in include_dirs], f"-I{csrc}"]
    headers = [path for path in all_sources(csrc) if path.endswith(HEADER_SUFFIXES)]
    jobs = []
    for name, flags in CPU_CAPABILITIES.items():
        for source in CAPABILITY_SOURCES:
            stem = os.path.splitext(os.path.basename(source))[0]
            obj = os.path.join(build_dir, "capabilities", f"{stem}.{name.lower()}.o")
            path = os.path.join(csrc, source)
            command = [compiler(), path, "-o", obj, *common, f"-DCPU_CAPABILITY={name}",
                       f"-DCPU_CAPABILITY_{name}", *flags]
            jobs.append((obj, command, [path, *headers]))

    def compile_one(job):
        obj, command, inputs = job
        if not (os.path.exists(obj) and all(os.path.getmtime(obj) >= os.path.getmtime(p) for p in inputs)):
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            subprocess.run(command, check=True)
        if progress is not None:
            progress(os.path.basename(obj))
        return obj

    workers = max(1, min(len(jobs), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, jobs))


def _cache_key(csrc: str, torch_version: str) -> str:
    digest = hashlib.sha256()
    from ._version import __version__
    for part in (__version__, torch_version, sys.version, shutil.which(compiler()) or ""):
        digest.update(part.encode())
    for path in all_sources(csrc):
        digest.update(os.path.relpath(path, csrc).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def cache_dir() -> str:
    root = os.environ.get("KDFAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kdfast")
    return root


#: set by load_cpu_extension: how the kernels of this process were obtained
BUILD_INFO: dict = {}


def load_cpu_extension() -> str:
    """Load the CPU kernels (``torch.ops.kdfast.*``): the extension installed with the package when it
    is there, else the one compiled for this torch in the cache, compiling it first if needed (one
    message, a progress bar, 1–5 minutes). Returns how: ``"installed"``, ``"cached"`` or
    ``"compiled"``. Raises ImportError saying why when there are no sources or no compiler, or the
    compile fails."""
    import torch  # noqa: F401  (libtorch's shared libraries must be loaded before the extension)
    try:
        from . import _C  # noqa: F401
        BUILD_INFO.update(how="installed", path=_C.__file__)
        return "installed"
    except ImportError as error:
        missing = error
    csrc = source_root()
    if csrc is None:
        raise ImportError(f"kdfast's CPU extension is not installed ({missing}) and its sources are not "
                          "shipped here, so it cannot be compiled")
    build_dir = os.path.join(cache_dir(), f"cpu-{_cache_key(csrc, torch.__version__)}")
    library = os.path.join(build_dir, "kdfast_C.so")
    if os.path.exists(library):
        torch.ops.load_library(library)
        BUILD_INFO.update(how="cached", path=library)
        return "cached"
    if shutil.which(compiler()) is None:
        raise ImportError(f"kdfast's CPU extension is not installed and there is no C++ compiler "
                          f"('{compiler()}') to build it for torch {torch.__version__}")
    _compile_into(build_dir, csrc)
    torch.ops.load_library(library)
    BUILD_INFO.update(how="compiled", path=library)
    return "compiled"


def _compile_into(build_dir: str, csrc: str) -> None:
    import fcntl

    import torch
    from torch.utils.cpp_extension import include_paths, load

    os.makedirs(build_dir, exist_ok=True)
    # one builder per cache entry (e.g. DDP ranks); not named "lock", which torch's own builder uses
    with open(os.path.join(build_dir, "kdfast-build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(build_dir, "kdfast_C.so")):
            return
        print(f"kdfast: compiling the CPU kernels for torch {torch.__version__} into {build_dir} "
              "(once per torch version; 1–5 minutes)", file=sys.stderr, flush=True)
        steps = len(CPU_CAPABILITIES) * len(CAPABILITY_SOURCES) + 1
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="kdfast kernels", unit="object", file=sys.stderr)
        except ImportError:
            bar = None
        try:
            objects = capability_objects(csrc, build_dir, include_paths(), int(torch._C._GLIBCXX_USE_CXX11_ABI),
                                         progress=(lambda _: bar.update(1)) if bar is not None else None)
            load(name="kdfast_C", sources=[os.path.join(csrc, source) for source in CPU_SOURCES],
                 extra_cflags=[*CXX_FLAGS, *OPENMP_FLAGS, "-std=c++20"], extra_include_paths=[csrc],
                 extra_ldflags=objects, build_directory=build_dir, is_python_module=False, verbose=False)
            if bar is not None:
                bar.update(1)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as error:
            raise ImportError(f"compiling kdfast's CPU kernels failed: {error}") from error
        finally:
            if bar is not None:
                bar.close()
