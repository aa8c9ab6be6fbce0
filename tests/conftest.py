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
