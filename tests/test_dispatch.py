"""backend="auto": what it picks per device, only what is verified there, a fallback to the
reference reported once, and available_backends that tells the truth on a CPU-only torch."""
import types
import warnings

import pytest
import torch

import kdfast
from kdfast import _dispatch, reference, verified


def fake_backend(name):
    """A backend module whose losses return their backend's name (the choice is what is tested)."""
    losses = {loss: (lambda *args, _name=name, **kwargs: _name) for loss in reference.LOSSES}
    return types.SimpleNamespace(LOSSES=losses, unavailable_reason=lambda device: None,
                                 row_softmax=f"{name}.row_softmax")


def run(name, backend, capability):
    return dict(backend=backend, device="GPU", capability=capability, date="2026-12-01", torch="2.11.0",
                triton="3.6.0", commit="abc", passed=10 if name == "pass" else 9, failed=0 if name == "pass" else 1,
                skipped=0, command="scripts/gpu-check")


@pytest.fixture
def dispatch_state(monkeypatch):
    """Isolated loaded-module tables, fallback reports and recorded capabilities."""
    monkeypatch.setattr(_dispatch, "_LOADED", dict(_dispatch._LOADED))
    monkeypatch.setattr(_dispatch, "_LOAD_FAILURES", dict(_dispatch._LOAD_FAILURES))
    monkeypatch.setattr(_dispatch, "_FALLBACK_REPORTED", set())
    monkeypatch.setattr(_dispatch, "_RECORDED_CAPABILITIES", dict(_dispatch._RECORDED_CAPABILITIES))
    monkeypatch.setattr(_dispatch, "_CUDA_CAPABILITIES", {0: "sm_90"})
    return monkeypatch


@pytest.fixture
def gpu_machine(dispatch_state):
    """A CUDA build of torch with a (pretend) sm_90 GPU and both GPU backends loaded."""
    dispatch_state.setattr(torch.cuda, "is_available", lambda: True)
    dispatch_state.setattr(torch.version, "cuda", "12.4")
    dispatch_state.setattr(torch.cuda, "current_device", lambda: 0)
    _dispatch._LOADED.update(triton=fake_backend("triton"), cuda=fake_backend("cuda"))
    _dispatch.refresh_verification([])
    return torch.device("cuda", 0)


def test_cpu_only_torch_lists_no_gpu_backend_for_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    names = kdfast.available_backends("kd_loss", "cuda")
    assert "triton" not in names and "cuda" not in names
    with pytest.raises(RuntimeError, match="triton.*CPU-only build|triton.*no CUDA device"):
        _dispatch.resolve("triton", "kd_loss", torch.device("cuda"))


def test_cuda_auto_order_puts_triton_before_the_cuda_kernels():
    order = _dispatch.AUTO_ORDER["cuda"]
    assert order.index("triton") < order.index("cuda") < order.index("reference")
    assert "cuda" in _dispatch.AUTO_NEEDS_RECORDED_RUN["cuda"]


def test_auto_on_a_gpu_picks_triton(gpu_machine):
    assert _dispatch.resolve("auto", "kd_loss", gpu_machine)() == "triton"
    assert _dispatch.resolve_kernel("auto", "row_softmax", gpu_machine) == "triton.row_softmax"
    assert kdfast.available_backends("kd_loss", gpu_machine) == ["triton", "reference", "cuda"]


def test_unverified_cuda_kernels_run_by_name_but_not_by_auto(gpu_machine):
    _dispatch._LOADED.pop("triton")
    _dispatch._LOAD_FAILURES["triton"] = "triton is not installed"
    assert _dispatch.resolve("cuda", "kd_loss", gpu_machine)() == "cuda"
    with pytest.warns(kdfast.ReferenceFallbackWarning, match="triton is not installed.*cuda: auto uses it only"):
        assert _dispatch.resolve("auto", "kd_loss", gpu_machine) is reference.kd_loss
    assert _dispatch.backend_status(gpu_machine)["cuda"] == {
        "available": True, "auto": False, "reason": _dispatch._unverified_reason("cuda", gpu_machine)}


@pytest.mark.parametrize("runs,expected", [
    ([run("pass", "cuda", "sm_90")], "cuda"),                                  # verified on this capability
    ([run("pass", "cuda", "sm_80")], "reference"),                             # only on another one
    ([run("pass", "triton", "sm_90")], "reference"),                           # another backend's run
    ([run("pass", "cuda", "sm_90"), run("fail", "cuda", "sm_90")], "reference"),  # the latest run failed
    ([run("fail", "cuda", "sm_90"), run("pass", "cuda", "sm_90")], "cuda"),       # ... or was fixed since
])
def test_auto_takes_the_cuda_kernels_only_after_a_passing_run_on_the_same_capability(gpu_machine, runs, expected):
    _dispatch._LOADED.pop("triton")
    _dispatch._LOAD_FAILURES["triton"] = "triton is not installed"
    _dispatch.refresh_verification(runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kdfast.ReferenceFallbackWarning)
        chosen = _dispatch.resolve("auto", "kd_loss", gpu_machine)
    assert (chosen() if chosen is not reference.kd_loss else "reference") == expected


def test_fallback_to_the_reference_warns_once_per_device_type(dispatch_state):
    _dispatch._LOADED.pop("cpu", None)
    _dispatch._LOAD_FAILURES["cpu"] = "kdfast._C does not load (a test)"
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.warns(kdfast.ReferenceFallbackWarning, match=r"on cpu tensors.*cpu: kdfast._C does not load"):
        kdfast.kd_loss(s, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kdfast.ReferenceFallbackWarning)
        kdfast.skd_loss(s, t)
        kdfast.nd_loss(s, t, torch.tensor([0, 1, 0]), torch.randn(2, 5))
        assert _dispatch.resolve_kernel("auto", "row_softmax", torch.device("cpu")) is None


def test_a_failed_backend_import_reports_the_fallback_at_once(dispatch_state):
    """An import that fails (at kdfast's import, or later for a backend left lazy) is reported
    then, outside any traced region, even if every later call is compiled."""
    _dispatch._LOADED.pop("cpu", None)
    dispatch_state.setitem(_dispatch.BACKEND_MODULES, "cpu", "kdfast.backends.not_a_backend")
    with pytest.warns(kdfast.ReferenceFallbackWarning, match="on cpu tensors.*not_a_backend"):
        assert _dispatch._import_backend("cpu") == (None, _dispatch._LOAD_FAILURES["cpu"])


def test_fallback_inside_a_fullgraph_compile_does_not_break_the_graph(dispatch_state):
    _dispatch._LOADED.pop("cpu", None)
    _dispatch._LOAD_FAILURES["cpu"] = "kdfast._C does not load (a test)"
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kdfast.ReferenceFallbackWarning)
        got = torch.compile(lambda a, b: kdfast.kd_loss(a, b), backend="eager", fullgraph=True)(s, t)
    torch.testing.assert_close(got, reference.kd_loss(s, t))


def test_a_backend_missing_at_import_is_imported_outside_the_traced_region(dispatch_state):
    """The lazy path (a backend kdfast's import did not load) breaks the graph at worst."""
    module = _dispatch._LOADED.pop("reference")
    torch._dynamo.reset()
    got = torch.compile(lambda a, b: kdfast.kd_loss(a, b, backend="reference"), backend="eager")(
        torch.ones(2, 3), torch.zeros(2, 3))
    assert _dispatch._LOADED["reference"] is module
    torch.testing.assert_close(got, reference.kd_loss(torch.ones(2, 3), torch.zeros(2, 3)))


def test_record_run_appends_and_verified_backends_reads(tmp_path):
    path = str(tmp_path / "verified.json")
    assert verified.load_runs(path) == []
    recorded = verified.record_run(path=path, backend="cuda", device="NVIDIA H200", capability="sm_90",
                                   passed=812, failed=0, skipped=3, command="scripts/gpu-check", commit="abc")
    assert recorded["torch"] == torch.__version__ and len(recorded["date"]) == 10
    verified.record_run(path=path, backend="triton", device="NVIDIA A100", capability="sm_80", passed=5, failed=1,
                        skipped=0, command="scripts/gpu-check")
    runs = verified.load_runs(path)
    assert [r["backend"] for r in runs] == ["cuda", "triton"] and list(runs[0]) == list(verified.FIELDS)
    assert verified.verified_capabilities("cuda", runs) == {"sm_90"}
    assert verified.verified_capabilities("triton", runs) == set()
    assert verified.verified_backends("cpu", runs) == {"reference", "cpu"}  # the CPU CI's, no entry needed
    with pytest.raises(ValueError, match="failed"):
        verified.record_run(path=path, backend="cuda", passed=1, failed=-1, skipped=0, command="x")
    verified.record_run(path=path, backend="cuda", device="NVIDIA H200", capability="sm_90", passed=5, failed=0,
                        skipped=0, command="x", complete=False, driver="570")  # cut short: verifies nothing
    runs = verified.load_runs(path)
    assert runs[-1]["driver"] == "570" and verified.verified_capabilities("cuda", runs) == set()


def test_committed_record_reads():
    runs = verified.load_runs()
    assert all(set(verified.FIELDS) <= set(run) for run in runs)
