"""Smoke test of the benchmark suite: its machinery on toy shapes, in a few seconds, no
torch.compile. Checks structure only (columns, coverage, derived fields), never timings."""
import csv
import math

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks.providers import Provider, providers_for
from benchmarks.roofline import min_bytes
from benchmarks.suite import COLUMNS, FAMILIES, Config, run, run_scaling

REQUIRED = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80", "dtype",
            "device", "threads", "kdfast_version", "torch_version", "date")
MODES = ("forward", "backward", "full")


def _standin(kernel, device):
    """A provider counted as a fused kdfast backend (the public API on the reference backend), so
    the fused-only columns — speed-up and memory ratio — are exercised before real backends exist."""
    def build():
        return lambda *inputs: kernel.public(*inputs, backend="reference", **kernel.options)
    return [Provider("kdfast-standin", "fused", build)]


@pytest.fixture(scope="module")
def tiny():
    config = Config(sweep="tiny", device=torch.device("cpu"), compile="none", min_run_time=0.002, threads=1,
                    extra_providers=_standin, progress=False)
    notes = []
    expected = {(kernel.name, provider.name) for family in FAMILIES.values() for kernel in family.kernels
                for provider in providers_for(kernel, config.device, compile_=False, notes=notes)
                + _standin(kernel, config.device)}
    return run(config), expected


def test_every_family_kernel_and_provider_has_all_rows(tiny):
    result, expected = tiny
    assert not [note for note in result.notes if "failed" in note], result.notes
    assert {row["family"] for row in result.rows} >= set(FAMILIES)
    for kernel, provider in expected:
        rows = [row for row in result.rows if (row["kernel"], row["provider"]) == (kernel, provider)]
        assert {row["mode"] for row in rows if row["metric"] == "time"} == set(MODES), (kernel, provider)
        memory = [row for row in rows if row["metric"] == "memory"]
        assert memory and memory[0]["p50"] > 0, (kernel, provider)
        for row in rows:
            if row["metric"] == "time":
                assert 0 < row["p20"] <= row["p50"] <= row["p80"]


def test_roofline_and_ratio_fields(tiny):
    result, _ = tiny
    copy = [row for row in result.rows if row["kernel"] == "copy"]
    assert copy and all(row["p50"] > 0 for row in copy)
    for family in ("row-softmax", "feature-centre"):
        for metric in ("bandwidth", "roofline_fraction"):
            rows = [row for row in result.rows if row["family"] == family and row["metric"] == metric]
            assert {row["mode"] for row in rows} == set(MODES)
            assert all(math.isfinite(row["p50"]) and row["p50"] > 0 for row in rows)
    speedups = [row for row in result.rows if row["metric"] == "speedup_vs_best_other"]
    assert {row["family"] for row in speedups} == set(FAMILIES)
    assert all(row["provider"].startswith("kdfast-") and row["p50"] > 0 for row in speedups)
    assert [row for row in result.rows if row["metric"] == "memory_vs_best_other"]


def test_min_bytes_definition():
    shape = {"N": 4096, "V": 32000}
    assert min_bytes("row-softmax", "full", shape, 4) == 12 * 4096 * 32000  # 12 B per logit in fp32
    assert min_bytes("row-softmax", "forward", shape, 2) == 4 * 4096 * 32000
    assert min_bytes("feature-centre", "full", {"B": 8, "d": 4, "C": 100}, 4) == (3 * 8 + 8) * 4 * 4
    assert min_bytes("landmark-gram", "full", {"B": 8, "d": 4, "m": 2}, 4) is None


def test_cli_writes_csv_markdown_and_plots(tmp_path):
    out = cli.main(["--tiny", "--families", "row-softmax", "--compile", "none", "--min-run-time", "0.002",
                    "--threads", "1", "--out-dir", str(tmp_path)])
    with open(out["csv"]) as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS and set(REQUIRED) <= set(reader.fieldnames)
        rows = list(reader)
    assert rows and all(row["device"] and row["torch_version"] and row["threads"] for row in rows)
    assert "| kernel |" in open(out["markdown"]).read()
    assert out["plots"] and all((tmp_path / path).exists() for path in out["plots"])


def test_scaling_sweep_reports_time_per_element():
    config = Config(sweep="tiny", device=torch.device("cpu"), compile="none", min_run_time=0.002, threads=1,
                    progress=False)
    result = run_scaling(config)
    per_element = [row for row in result.rows if row["metric"] == "ns_per_element"]
    assert {row["x_name"].split()[0] for row in per_element} == {"N", "V"}
    assert all(row["p50"] > 0 for row in per_element)


def test_slow_steps_are_measured_once_and_kernels_can_be_chosen():
    """A step slower than ``single_sample_after`` gets one forward+backward time (the profiled
    first call) and its memory from the same step; --kernels limits the run."""
    config = Config(sweep="tiny", device=torch.device("cpu"), compile="none", min_run_time=0.002, threads=1,
                    families=("fused-linear",), kernels=("fused_linear_kd_loss",), single_sample_after=0.0,
                    progress=False)
    result = run(config)
    rows = [row for row in result.rows if row["family"] == "fused-linear"]
    assert {row["kernel"] for row in rows} == {"fused_linear_kd_loss"}
    times = [row for row in rows if row["metric"] == "time"]
    assert times and {row["mode"] for row in times} == {"full"}
    assert all("one sample" in row["note"] and row["p50"] > 0 for row in times)
    assert {row["provider"] for row in rows if row["metric"] == "memory_extra"} == {row["provider"] for row in times}
    assert any("one sample" in note for note in result.notes)
