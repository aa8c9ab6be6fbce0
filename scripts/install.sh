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
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
