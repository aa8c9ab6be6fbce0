"""Test set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors under the interpreter; the flag must be set
before triton is imported anywhere, hence here, at the very top.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

#: float64 everywhere the reference is compared with an independent implementation
torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- the backends the family suites run on (tests/backends.py) ----------------------------------

import backends as _backends  # noqa: E402


@pytest.fixture(params=_backends.BACKENDS)
def backend(request):
    """Every backend: reference, cpu, triton, cuda (skipped where it cannot run)."""
    return request.param


@pytest.fixture(params=_backends.BACKENDS_AND_VARIANTS)
def backend_or_variant(request):
    """Every backend plus the Triton kernels forced onto their multi-pass paths."""
    return request.param


@pytest.fixture(params=_backends.params([_backends.TRITON_STREAMED]))
def triton_streamed(request):
    """Only the Triton kernels forced onto their multi-pass paths."""
    return request.param
