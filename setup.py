"""kdfast packaging. Install with ``pip install --no-build-isolation -e .`` after
``pip install torch==2.13.0`` (see README): the runtime requirement on torch is a range that the
pinned CPU wheel satisfies, so pip adds nothing and never pulls the CUDA wheels."""
from setuptools import find_packages, setup

setup(
    name="kdfast",
    version="0.1.0",
    description="Fused, memory-lean knowledge-distillation losses (KD, SKD, ND, KDA/Nystrom, Tang et al., L2RKD)",
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "tqdm"],
    extras_require={"test": ["pytest", "hypothesis", "numpy"], "bench": ["matplotlib", "numpy"]},
)
