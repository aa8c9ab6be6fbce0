#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with the pinned CPU build of torch
# (an unpinned torch would pull several GB of CUDA packages), the tools, then kdfast itself
# (built against that torch, hence --no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 "setuptools>=77"
.venv/bin/python -m pip install -q --disable-pip-version-check \
    "triton>=3.6,<3.10" numpy ninja pytest hypothesis tqdm matplotlib scikit-learn
# the comparison packages of the test and bench extras (parity tests, benchmarks/llm.py), with the torch pin on
# the same command line so that their dependencies (transformers, accelerate) cannot replace the CPU torch
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 "trl==1.16.0" "transformers==5.25.0" "liger-kernel==0.8.5"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
