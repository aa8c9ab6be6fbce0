"""Smoke test of ``python -m benchmarks.llm``: every provider runs (or is skipped with a reason) at a
toy shape, the table and the files are written. Structure only, never timings; no torch.compile
(``--quick`` with compilation is run by hand: it costs a compile per provider)."""
import csv
import importlib.util

import pytest

from benchmarks import llm


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm")
    return llm.main(["--quick", "--shape", "64x32x512", "--no-compile", "--min-run-time", "0.002", "--topk", "8", "64",
                     "--out-dir", str(out)])


def test_every_divergence_and_provider_has_a_row(quick):
    rows = quick["rows"]
    assert {row.divergence for row in rows} == set(llm.DIVERGENCES)
    for divergence in llm.DIVERGENCES:
        providers = {row.provider for row in rows if row.divergence == divergence}
        assert providers == {"gemm-floor", "kdfast", "trl", "liger", "torch-compile", "torch-eager", "linear-ce",
                             "kdfast-topk-k8", "kdfast-topk-k64"}
    failed = [(row.divergence, row.provider, row.note) for row in rows if row.status == "failed"]
    assert not failed, failed
    for row in rows:
        if row.status == "ok":
            assert 0 < row.p20 <= row.p50 <= row.p80 and row.extra_mib is not None and row.extra_mib >= 0
            assert row.ratios["gemm-floor"] > 0
        else:
            assert row.status == "skipped" and row.note


def test_expected_providers_run(quick):
    ran = {(row.divergence, row.provider) for row in quick["rows"] if row.status == "ok"}
    for divergence in llm.DIVERGENCES:
        assert {(divergence, "gemm-floor"), (divergence, "torch-eager"), (divergence, "kdfast")} <= ran
        if importlib.util.find_spec("trl") is not None:
            assert (divergence, "trl") in ran
        if importlib.util.find_spec("liger_kernel") is not None:
            assert (divergence, "liger") in ran
    assert ("forward_kl", "linear-ce") in ran
    assert not any(provider == "linear-ce" for divergence, provider in ran if divergence != "forward_kl")


def test_files_carry_versions_and_ratios(quick):
    text = open(quick["markdown"]).read()
    assert "× GEMM floor" in text and "× kdfast" in text and "N=64 H=32 V=512" in text and "2 threads" in text
    for name in ("torch", "trl", "liger", "kdfast"):
        assert f"{name} {quick['versions'][name]}" in text
    with open(quick["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(quick["rows"])
    assert {row["threads"] for row in rows} == {"2"} and {row["V"] for row in rows} == {"512"}


def test_torch_divergence_matches_kdfast_reference():
    """The plain-PyTorch divergence the materialised providers time is the one kdfast specifies."""
    import torch

    import kdfast
    student, teacher = torch.randn(6, 40) * 3, torch.randn(6, 40) * 3
    for divergence, beta in llm.DIVERGENCES.items():
        expected = kdfast.divergence_loss(student, teacher, divergence="jsd", beta=beta, temperature=1.7,
                                          backend="reference")
        torch.testing.assert_close(llm.torch_divergence(student, teacher, beta, 1.7), expected, rtol=1e-5, atol=1e-6)
