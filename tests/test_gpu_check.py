"""scripts/gpu-check on a CPU machine: its plan (--dry-run), the bookkeeping it does around pytest
and the benchmarks, and that the benchmark families carry the GPU target shapes it announces.
Nothing here needs a GPU, and nothing runs the real check (that is the device's job)."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu-check")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", os.path.join(ROOT, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_entry_point_is_executable():
    assert os.access(SCRIPT, os.X_OK)
    assert os.access(os.path.join(ROOT, "scripts", "gpu_check.py"), os.R_OK)


def test_dry_run_prints_the_plan_without_a_gpu():
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    done = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    # the steps, in order, with their commands
    positions = [plan.index(step) for step in ("1. probe", "2. wheels", "3. build", "4. tests", "5. bench",
                                               "6. record", "7. outputs")]
    assert positions == sorted(positions)
    assert "setup.py build_ext --inplace" in plan and "MAX_JOBS=" in plan
    assert "-m pytest tests" in plan and gpu_check.TESTS_K in plan and "-p gpu_check" in plan
    assert "--targets --device cuda" in plan and "--time-limit" in plan
    assert "record_run(backend=triton|cuda" in plan
    # the GPU target shapes of issue 13
    for shape in ("N=8192 V=32000", "N=8192 V=128256", "N=8192 H=4096 V=128256", "B=512 d=2048",
                  "B=1024 d=2048 m=100"):
        assert shape in plan, shape
    assert "bfloat16" in plan
    # the budget and the device-tool command
    assert f"{gpu_check.DEFAULT_BUDGET:.0f} s in all" in plan and "timeout_s=600" in plan
    assert 'run(command="bash scripts/gpu-check"' in plan
    for name in gpu_check.OUT_FILES:
        assert name in plan
    # nothing was written by a dry run
    assert "step " not in plan


def test_budget_fits_the_device_tool():
    assert gpu_check.DEFAULT_BUDGET <= 570  # 600 s per command, python start-up and the last copy to $OUT
    assert len(gpu_check.OUT_FILES) <= 8  # the device tool brings back at most 8 files
    clock = gpu_check.Clock(gpu_check.DEFAULT_BUDGET)
    # the build leaves the tests and the benchmarks their minimum, whatever its own maximum
    assert clock.allow("build", ("tests", "bench", "finish")) == gpu_check.STEP_MAX["build"]
    late = gpu_check.Clock(200.0)
    assert late.allow("build", ("tests", "bench", "finish")) == pytest.approx(200 - 60 - 60 - 15, abs=1)
    assert gpu_check.Clock(10.0).allow("tests", ("bench", "finish")) == 0.0


def test_gpu_targets_are_what_the_benchmarks_run_on_cuda():
    from benchmarks.suite import FAMILIES, Config, plan, sweep_sizes
    for family_name, shapes in gpu_check.GPU_TARGETS.items():
        family = FAMILIES[family_name]
        assert [family.shape(values) for values in family.sizes["targets-gpu"]] == shapes, family_name
    # --targets: GPU shapes on a CUDA device, the CPU shapes unchanged on CPU
    for device, key in (("cuda", "targets-gpu"), ("cpu", "targets")):
        config = Config(sweep="targets", device=torch.device(device), compile="largest")
        for family in FAMILIES.values():
            assert sweep_sizes(family, config) == family.sizes[key]
    notes = []
    cases = plan(Config(sweep="targets", device=torch.device("cuda"), dtype=torch.bfloat16,
                        families=("row-softmax",), compile="largest"), notes)
    shapes = {(case.kernel.name, case.provider.name, case.family.describe(case.shape)) for case in cases}
    assert ("kd_loss", "eager", "N=8192 V=128256") in shapes
    assert ("kd_loss", "compile", "N=8192 V=128256") in shapes
    assert ("kd_loss", "compile", "N=8192 V=32000") not in shapes  # compile at the largest shape only
    # every target family is benchmarked, the LLM-sized ones in bf16
    assert sorted(f for run in gpu_check.BENCH_RUNS for f in run[1]) == sorted(gpu_check.GPU_TARGETS)
    assert {f for run in gpu_check.BENCH_RUNS if run[2] == "bfloat16" for f in run[1]} == {"row-softmax", "fused-linear"}


def test_time_limited_benchmark_runs_compile_last_and_skips_what_is_left():
    from benchmarks.suite import Config, run
    config = Config(sweep="tiny", device=torch.device("cpu"), compile="all", min_run_time=0.002, threads=1,
                    families=("feature-centre",), memory=False, progress=False, time_limit=0.0)
    result = run(config)
    skipped = [note for note in result.notes if "skipped, time limit" in note]
    assert skipped and not [row for row in result.rows if row["kernel"] == "nd_loss"]


@pytest.mark.parametrize("nodeid, backend", [
    ("tests/test_rowsoftmax.py::test_dtypes[triton-kd-default-float32]", "triton"),
    ("tests/test_rowsoftmax.py::test_streamed_path[triton-streamed-kd-default-float32]", "triton-streamed"),
    ("tests/test_rowsoftmax.py::test_dtypes[cuda-kd-default-bfloat16]", "cuda"),
    ("tests/test_feature_centre.py::test_nd[cpu-float32-none]", "cpu"),
    ("tests/test_landmark_gram.py::test_nystrom[reference-1-2]", "reference"),
    ("tests/test_backend_specific.py::test_dispatch_names_triton_for_every_loss", "triton"),
    ("tests/test_cuda_sources.py::test_cuda_source_compiles[rowsoftmax.cu]", "cuda"),
    ("tests/test_modules.py::test_something", "other"),
])
def test_backend_of_test_ids(nodeid, backend):
    assert gpu_check.backend_of(nodeid) == backend


def test_outcomes_counted_per_backend_with_tests_not_run(tmp_path):
    events = tmp_path / "events.jsonl"
    ids = ["t.py::a[triton-x]", "t.py::b[triton-streamed-x]", "t.py::c[cuda-x]", "t.py::d[cuda-y]",
           "t.py::e[triton-y]", "t.py::f[triton-z]"]
    lines = [{"event": "collected", "nodeids": ids}]

    def report(nodeid, when, outcome):
        lines.append({"event": "report", "nodeid": nodeid, "when": when, "outcome": outcome})
    for when in ("setup", "call", "teardown"):
        report(ids[0], when, "passed")
        report(ids[1], when, "passed")
    report(ids[2], "setup", "skipped")
    report(ids[2], "teardown", "passed")
    report(ids[3], "setup", "passed")
    report(ids[3], "call", "failed")
    report(ids[3], "teardown", "passed")
    report(ids[4], "setup", "failed")  # a fixture error
    report(ids[5], "setup", "passed")  # cut off by the time limit: not run
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\n{\"event\": \"rep")  # a line cut by a kill
    collected, outcome, _ = gpu_check.read_events(str(events))
    counts = gpu_check.count_by_backend(collected, outcome)
    assert counts["triton"] == dict(passed=1, failed=0, errors=1, skipped=0, not_run=1, total=3)
    assert counts["triton-streamed"]["passed"] == 1
    assert counts["cuda"] == dict(passed=0, failed=1, errors=0, skipped=1, not_run=0, total=2)
    merged = gpu_check.verified_counts(counts)
    assert merged["triton"]["passed"] == 2 and merged["triton"]["total"] == 4
    assert merged["cuda"]["failed"] == 1


def test_a_step_over_its_budget_is_stopped_and_recorded(tmp_path):
    log = tmp_path / "step.log"
    result = gpu_check.run_command([sys.executable, "-c", "import time; time.sleep(30)"], 1.0, str(log),
                                   interrupt_first=True)
    assert result["status"] == "timeout" and result["seconds"] < 10
    assert "time budget" in log.read_text()
    failed = gpu_check.run_command([sys.executable, "-c", "raise SystemExit(3)"], 30.0, str(log))
    assert failed["status"] == "failed" and failed["rc"] == 3


def test_unpack_copies_only_benchmark_results(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    (tree / "benchmarks" / "results").mkdir(parents=True)
    device = tmp_path / "device"
    device.mkdir()
    payload = tmp_path / "x.csv"
    payload.write_text("kernel\n")
    with tarfile.open(device / gpu_check.TARBALL, "w:gz") as tar:
        tar.add(payload, arcname="benchmarks/results/kdfast-gpu-targets-rows-bf16_nvidia-h200_2026-12-02.csv")
        tar.add(payload, arcname="gpu-check/pytest.log")
        tar.add(payload, arcname="fake-results/gpu-check_cpu-fake_2026-12-02.md")
        tar.add(payload, arcname="benchmarks/../../escape.csv")
    monkeypatch.setattr(gpu_check, "ROOT", str(tree))
    assert gpu_check.main(["--unpack", str(device), "--no-record"]) == 0
    copied = sorted(os.listdir(tree / "benchmarks" / "results"))
    assert copied == ["kdfast-gpu-targets-rows-bf16_nvidia-h200_2026-12-02.csv"]
    assert not (tmp_path / "escape.csv").exists()


def test_the_snippets_run_in_subprocesses_compile():
    for name in ("PROBE", "IMPORT_CHECK", "JIT_CUDA_BUILD", "RECORD"):
        compile(getattr(gpu_check, name), name, "exec")


def test_probe_runs_on_cpu(tmp_path):
    log = tmp_path / "probe.log"
    result = gpu_check.run_command([sys.executable, "-c", gpu_check.PROBE], 120, str(log))
    assert result["status"] == "ok", log.read_text()
    probe = gpu_check.parse_marker(str(log), "GPU_CHECK_PROBE")
    assert probe["torch"] == torch.__version__ and probe["cuda_available"] == torch.cuda.is_available()
