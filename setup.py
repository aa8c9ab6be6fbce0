"""kdfast's compiled parts (the metadata is in pyproject.toml).

* ``kdfast._C``, the CPU kernels, is built here when torch is importable in the build environment
  (``pip install --no-build-isolation .`` next to an installed torch), with the recipe of
  ``kdfast/_build.py``; the build is optional: without a compiler the install still succeeds. In an
  isolated build environment (plain ``pip install .``, ``pip wheel .``, ``python -m build``) there is
  no torch, so nothing is compiled here and the package compiles the kernels on first use for the
  torch it finds, then caches them (kdfast/_build.py).
* ``kdfast._C_cuda``, the CUDA kernels and their torch glue, only when that torch has CUDA and nvcc
  is found.
* ``csrc/`` is always shipped inside the package as ``kdfast/_csrc`` (for the first-use build).

``KDFAST_NO_EXTENSION=1`` skips the compiled parts (the package then compiles on first use).
"""
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _recipe():
    """kdfast/_build.py, loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_kdfast_build", os.path.join(ROOT, "kdfast", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """The package plus a copy of csrc/ as kdfast/_csrc, from which kdfast/_build.py compiles the
    kernels on first use when the wheel carries no compiled extension."""

    def run(self):
        super().run()
        if not self.editable_mode and os.path.isdir(CSRC):
            target = os.path.join(self.build_lib, "kdfast", "_csrc")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(CSRC, target)


def _extensions():
    if os.environ.get("KDFAST_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, include_paths
    except ImportError:  # an isolated build environment: the kernels are compiled on first use
        return [], {}
    recipe = _recipe()

    class BuildWithCapabilities(BuildExtension):
        """BuildExtension plus the per-instruction-set objects of the hot kernel sources (setuptools
        has no per-source flags, so they are compiled by the recipe and linked in as extra objects)."""

        def build_extensions(self):
            for extension in self.extensions:
                if getattr(extension, "with_capabilities", False):
                    objects = recipe.capability_objects(CSRC, os.path.join(ROOT, self.build_temp), include_paths(),
                                                        int(torch._C._GLIBCXX_USE_CXX11_ABI))
                    extension.extra_objects = list(extension.extra_objects or []) + objects
            super().build_extensions()

    cpu = CppExtension("kdfast._C", [os.path.join("csrc", source) for source in recipe.CPU_SOURCES],
                       include_dirs=[CSRC], extra_compile_args={"cxx": recipe.CXX_FLAGS + recipe.OPENMP_FLAGS},
                       optional=True)
    cpu.with_capabilities = True
    extensions = [cpu]
    if torch.version.cuda and shutil.which("nvcc"):
        extensions.append(CUDAExtension("kdfast._C_cuda", [os.path.join("csrc", source) for source in
                                                           recipe.CUDA_SOURCES],
                                        include_dirs=[CSRC], optional=True,
                                        extra_compile_args={"cxx": recipe.CXX_FLAGS, "nvcc": recipe.NVCC_FLAGS}))
    return extensions, {"build_ext": BuildWithCapabilities.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources

setup(ext_modules=ext_modules, cmdclass=cmdclass)
