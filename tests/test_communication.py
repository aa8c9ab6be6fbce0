"""benchmarks/communication.py: the collectives the vocabulary-parallel losses issue, as recorded by the
implementation itself in a 1-process gloo group, equal the documented table (kdfast.parallel.vocab's
docstring, spec §8), and the committed results file is what the script computes."""
import math
import os

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

from benchmarks import communication as comm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, V, P, H = 8192, 128256, 8, 4096


@pytest.fixture(scope="module")
def counts():
    with comm.process_group() as group:
        return comm.record_counts(group)


def test_row_losses_issue_the_documented_collectives(counts):
    for key, ops in comm.DOCUMENTED.items():
        assert [r.op for r in counts[key]] == ops, key
        assert all(r.shape[0] == 16 and len(r.shape) == 2 for r in counts[key]), key  # [rows, m] each
    assert len(counts["kd"]) == 2 and len(counts["jsd"]) == 3 and len(counts["topk"]) == 2


def test_fused_linear_chunks_plus_one_hidden_all_reduce(counts):
    for key in ("fused_kd", "fused_kd_bf16"):
        records = counts[key]
        chunks = math.ceil(16 / 5)
        assert [r.op for r in records] == ["max", "sum"] * chunks + ["sum"], key
        assert records[-1].shape == (16, 8)  # the [N, H] hidden-state gradient, once per call
        assert [r.shape[0] for r in records[:-1:2]] == [5, 5, 5, 1]


def test_table_at_llama3_scale(counts):
    rows = {r["key"]: r for r in comm.table(counts, N, V, P, H)}
    kd = rows["kd"]
    assert kd["collectives"] == 2 and kd["values_per_row"] == [2, 5]
    assert kd["stats_payload"] == N * 7 * 4
    assert kd["sent"] == pytest.approx(2 * (P - 1) / P * N * 7 * 4)
    assert kd["naive_fp32"] == pytest.approx(2 * (P - 1) / P * N * V * 4)  # student + teacher gathered
    assert rows["topk"]["naive_bf16"] == pytest.approx((P - 1) / P * N * V * 2)  # the student only
    fused = rows["fused_kd"]
    assert comm.default_chunk_size(N, V // P) == 1046 and fused["chunks"] == 8
    assert fused["collectives"] == 8 * 2 + 1 and fused["hidden_payload"] == N * H * 4
    assert rows["jsd"]["collectives"] == 3
    text = comm.markdown(list(rows.values()), N, V, P, H, 1)
    committed = os.path.join(ROOT, "benchmarks", "results", f"communication_tp-kd_N{N}-V{V}-P{P}.md")
    with open(committed) as fh:
        assert fh.read() == text, "benchmarks/results is stale: rerun python -m benchmarks.communication"


def test_ring_formulas():
    assert comm.ring_bytes("all-reduce", 800, 8) == 1400
    assert comm.ring_bytes("all-gather", 800, 8) == 700
    assert comm.ring_bytes("reduce-scatter", 800, 8) == 700
    assert comm.ring_bytes("all-reduce", 800, 1) == 0
