"""python -m kdfast.info: versions, the CPU kernels' build, the backends per device and their
verification."""
import os
import subprocess
import sys

import torch

import kdfast
from kdfast import info, verified


def test_module_runs_and_reports_the_cpu_backend():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, "-m", "kdfast.info"], capture_output=True, text=True, cwd=root,
                               env=environment, timeout=300)
    assert completed.returncode == 0, completed.stderr
    text = completed.stdout
    assert f"kdfast  {kdfast.__version__}" in text and f"torch   {torch.__version__}" in text
    assert "triton  " in text and "CPU kernels:" in text and "SIMD level in use:" in text
    assert "\ncpu: " in text and "\n  cpu  " in text and "\ncuda: " in text


def test_report_is_a_dict_of_what_the_text_shows():
    report = info.report()
    assert report["kdfast"] == kdfast.__version__ and report["torch"] == torch.__version__
    assert set(report["devices"]) == {"cpu", "cuda"}
    cpu = report["devices"]["cpu"]["backends"]
    assert cpu["reference"]["available"] and cpu["reference"]["verified"]
    if cpu["cpu"]["available"]:
        assert cpu["cpu"]["auto"] and cpu["cpu"]["verified"]
        assert report["cpu_kernels"]["simd"] in ("avx512", "avx2", "default")
        assert report["cpu_kernels"]["how"] in ("installed", "cached", "compiled")
    if not torch.cuda.is_available():
        cuda = report["devices"]["cuda"]
        assert not cuda["present"] and not any(backend["available"] for backend in cuda["backends"].values())
    assert "verification record" in info.format_report(report)


def test_recorded_gpu_runs_are_shown(monkeypatch):
    run = dict(backend="cuda", device="NVIDIA H200", capability="sm_90", date="2026-12-01", torch="2.11.0",
               triton="3.6.0", commit="abc", passed=812, failed=0, skipped=3, command="scripts/gpu-check")
    monkeypatch.setattr(verified, "load_runs", lambda path=None: [run])
    text = info.format_report(info.report())
    assert "recorded on sm_90" in text
