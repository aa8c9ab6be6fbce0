"""The backends every family suite (test_rowsoftmax, test_feature_centre, test_landmark_gram) runs
on, and the one way they are held against the truth.

The truth is always ``kdfast.reference`` in float64 on the (upcast) inputs the backend saw. Adding a
backend is one entry of ``ALL``: its name, the device of its tensors, whether it can afford big
shapes, and its tolerances. A backend that cannot run here is skipped with the reason.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Optional

import pytest
import torch

import kdfast
from kdfast import reference

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16, F64]

#: (rel, abs): |actual − expected| ≤ rel·scale + abs. Losses: scale = |expected| per entry.
#: Gradients: scale = the largest finite |expected| of the tensor.
Tol = tuple[float, float]


def _table(loss: dict, grad: dict) -> dict:
    return {dtype: (loss[dtype], grad[dtype]) for dtype in DTYPES}


#: compiled (C++) kernels: fp32 accumulators and a few-ulp exp; bf16/fp16 gradients rounded once
COMPILED = _table(loss={F64: (1e-10, 1e-10), F32: (2e-5, 2e-5), BF16: (2e-5, 2e-5), F16: (2e-5, 2e-5)},
                  grad={F64: (1e-10, 1e-10), F32: (2e-5, 2e-5), BF16: (1e-2, 1e-2), F16: (2e-3, 2e-3)})
#: Triton: fp64 inputs are computed in fp64 but hyper-parameters travel as fp32
TRITON = _table(loss={F64: (1e-6, 1e-6), F32: (2e-5, 2e-5), BF16: (2e-5, 2e-5), F16: (2e-5, 2e-5)},
                grad={F64: (1e-6, 1e-9), F32: (2e-6, 2e-9), BF16: (1e-2, 1e-5), F16: (2e-3, 2e-6)})
#: Triton's ND and landmark-Gram kernels: fp32 sums of d (or m) products for fp32 and half inputs,
#: fp64 throughout for fp64 inputs
TRITON_FAMILY = {
    "feature_centre": _table(loss={F64: (1e-9, 1e-9), F32: (1e-5, 2e-4), BF16: (1e-5, 2e-4), F16: (1e-5, 2e-4)},
                             grad={F64: (1e-9, 1e-12), F32: (2e-6, 2e-9), BF16: (1e-2, 1e-5), F16: (2e-3, 2e-6)}),
    "landmark_gram": _table(loss={F64: (1e-9, 1e-9), F32: (1e-5, 1e-5), BF16: (1e-4, 1e-4), F16: (1e-4, 1e-4)},
                            grad={F64: (1e-9, 1e-12), F32: (1e-5, 1e-9), BF16: (1e-2, 1e-6), F16: (2e-3, 1e-6)}),
}
#: the reference itself in fp32 (bf16/fp16 inputs are upcast to fp32) against fp64
REFERENCE = _table(loss={F64: (1e-12, 1e-12), F32: (2e-5, 2e-5), BF16: (2e-5, 2e-5), F16: (2e-5, 2e-5)},
                   grad={F64: (1e-12, 1e-12), F32: (2e-5, 2e-5), BF16: (1e-2, 1e-2), F16: (2e-3, 2e-3)})


def _import_reason(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"{module} does not import ({error})"
    return None


def _triton_reason() -> Optional[str]:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device and TRITON_INTERPRET is not set: nothing can run Triton kernels"
    return _import_reason("kdfast.backends.triton")


@dataclasses.dataclass(frozen=True)
class Backend:
    id: str                       #: the pytest id
    name: str                     #: the ``backend=`` value of the public ops
    device: str                   #: where its tensors live
    fast: bool                    #: False: only tiny shapes (the Triton interpreter runs programs in Python)
    tolerance: dict               #: dtype → (loss Tol, grad Tol)
    family_tolerance: dict = dataclasses.field(default_factory=dict)  #: family → such a table, overriding
    skip: Optional[str] = None    #: why it cannot run here
    kernel_module: Optional[str] = None  #: module with the raw kernels (row_softmax, feature_centre, landmark_gram)
    kernel_options: Optional[dict] = None  #: forced kernel keywords (the streamed Triton variant); None: public ops

    def pick(self, big, small):
        """``big`` where the backend can afford it, else ``small``."""
        return big if self.fast else small

    def tol(self, dtype: torch.dtype, family: str = "rowsoftmax") -> tuple[Tol, Tol]:
        return self.family_tolerance.get(family, self.tolerance)[dtype]

    def kernels(self):
        """The backend's raw kernels module, or skip (the reference has none)."""
        if self.kernel_module is None:
            pytest.skip(f"backend {self.id!r} has no raw kernels")
        return importlib.import_module(self.kernel_module)

    def call(self, loss: str, *args, **options):
        """The loss ``loss`` of this backend: the public op, or (for a forced kernel variant) the
        backend's losses rebuilt on kernels with those keywords, with the public defaults filled in."""
        if self.kernel_options is None:
            return getattr(kdfast, loss)(*args, backend=self.name, **options)
        return self._variant_losses()[loss](*args, **{**getattr(reference, loss).__kwdefaults__, **options})

    def _variant_losses(self):
        if self.id in _VARIANT_LOSSES:
            return _VARIANT_LOSSES[self.id]
        from kdfast.backends import _fused
        module = self.kernels()
        extra = self.kernel_options
        losses = _fused.build_losses(functools.partial(module.row_softmax, **extra.get("row_softmax", {})),
                                     functools.partial(module.feature_centre, **extra.get("feature_centre", {})),
                                     functools.partial(module.landmark_gram, **extra.get("landmark_gram", {})))
        return _VARIANT_LOSSES.setdefault(self.id, losses)


_VARIANT_LOSSES: dict = {}


_GPU = torch.cuda.is_available()
ALL = [
    Backend("reference", "reference", "cpu", True, REFERENCE),
    Backend("cpu", "cpu", "cpu", True, COMPILED, skip=_import_reason("kdfast.backends.cpu"),
            kernel_module="kdfast.backends.cpu"),
    Backend("triton", "triton", "cuda" if _GPU else "cpu", _GPU, TRITON, TRITON_FAMILY, skip=_triton_reason(),
            kernel_module="kdfast.backends.triton"),
    Backend("cuda", "cuda", "cuda", True, COMPILED,
            skip=None if _GPU and _import_reason("kdfast.backends.cuda") is None else
            "no CUDA device or kdfast's CUDA extension does not load", kernel_module="kdfast.backends.cuda"),
]
#: the Triton kernels forced onto their multi-pass paths: 16-column row blocks (streamed online
#: softmax), 16-wide ND blocks (two passes), at most 16 fused landmarks (G through the scratch GEMM)
TRITON_STREAMED = dataclasses.replace(
    ALL[2], id="triton-streamed",
    kernel_options=dict(row_softmax=dict(block_size=16), feature_centre=dict(block_size=16),
                        landmark_gram=dict(max_fused_m=16)))


#: KDFAST_TEST_BACKENDS=triton,cuda runs the suites for those backends only (scripts/gpu-check)
SELECTED = {name.strip() for name in os.environ.get("KDFAST_TEST_BACKENDS", "").split(",") if name.strip()}


def params(backends) -> list:
    return [pytest.param(b, id=b.id, marks=[pytest.mark.skipif(b.skip is not None, reason=b.skip or "")])
            for b in backends if not SELECTED or b.name in SELECTED]


BACKENDS = params(ALL)
#: every backend plus the forced multi-pass variants, for the tests of paths a block size changes
BACKENDS_AND_VARIANTS = params(ALL + [TRITON_STREAMED])


# --- running and comparing ----------------------------------------------------------------------


def run(fn, student: torch.Tensor, *args, upstream: Optional[torch.Tensor] = None, **options):
    """(loss, ∂(Σ loss·upstream)/∂student) of ``fn(student, *args, **options)``; upstream 1 if None."""
    x = student.detach().clone().requires_grad_()
    loss = fn(x, *args, **options)
    weights = torch.ones_like(loss) if upstream is None else upstream.to(loss.device, loss.dtype).expand_as(loss)
    (grad,) = torch.autograd.grad(loss, x, weights)
    return loss.detach(), grad


def f64(tensor):
    """The reference's view of an input: the same values in float64 (labels and None unchanged)."""
    if tensor is None or not tensor.is_floating_point():
        return tensor
    return tensor.double()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: Tol, what: str, *, per_entry: bool) -> None:
    """Same shape, the same NaN / +inf / −inf entries, and the finite entries within tolerance:
    ``per_entry`` (losses) relative to each |expected|, else to the largest finite |expected|."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    for name, test in (("NaN", torch.isnan), ("+inf", lambda t: t == float("inf")),
                       ("-inf", lambda t: t == float("-inf"))):
        got, want = test(a), test(e)
        if not torch.equal(got, want):
            rows = lambda m: "the scalar" if m.dim() == 0 else sorted({int(i) for i in m.nonzero()[:, 0]})  # noqa: E731
            raise AssertionError(f"{what}: {name} pattern differs: {name} at rows {rows(got)} "
                                 f"(reference: rows {rows(want)}), entries {int(got.sum())} vs {int(want.sum())}")
    finite = torch.isfinite(e)
    if not finite.any():
        return
    rel, absolute = tol
    error = (a - e).abs()[finite]
    bound = rel * (e.abs()[finite] if per_entry else e[finite].abs().max()) + absolute
    worst = (error - bound).argmax()
    assert bool((error <= bound).all()), (f"{what}: error {error[worst].item():.3g} > bound {bound.flatten()[worst].item() if bound.dim() else bound.item():.3g} "
                                          f"(expected {e[finite][worst].item():.6g}, got {a[finite][worst].item():.6g})")


def compare(backend: Backend, loss: str, student: torch.Tensor, *args, family: str = "rowsoftmax",
            upstream: Optional[torch.Tensor] = None, **options):
    """The backend's loss and student gradient against the float64 reference's; returns both pairs."""
    got = run(functools.partial(backend.call, loss), student, *args, upstream=upstream, **options)
    want = run(getattr(kdfast, loss), f64(student), *[f64(a) for a in args], upstream=f64(upstream),
               backend="reference", **options)
    # the loss is returned in fp32 (fp64 for fp64 inputs): a reference value beyond that range is ±inf
    want = (want[0].to(got[0].dtype), want[1])
    loss_tol, grad_tol = backend.tol(student.dtype, family)
    assert got[1].dtype == student.dtype, f"{loss}: gradient dtype {got[1].dtype}, input {student.dtype}"
    assert_matches(got[0], want[0], loss_tol, f"{backend.id} {loss} loss", per_entry=True)
    assert_matches(got[1], want[1], grad_tol, f"{backend.id} {loss} grad", per_entry=False)
    return got, want


def assert_nan_rows_whole(loss: torch.Tensor, grad: torch.Tensor, what: str) -> None:
    """The rule: a row whose loss is NaN has a wholly NaN gradient row."""
    nan_rows = loss.isnan().reshape(-1)
    grad = grad.reshape(nan_rows.shape[0], -1)
    partial = nan_rows & ~grad.isnan().all(dim=-1)
    assert not partial.any(), f"{what}: NaN loss rows {partial.nonzero().flatten().tolist()} have finite gradient entries"
