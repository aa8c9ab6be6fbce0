"""The examples run end to end in their tiny modes (the full runs are not part of the suite)."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("sklearn", reason="the digits example needs scikit-learn's bundled data set")


def run(script, *args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_digits_quick(tmp_path):
    out = run("distill_digits.py", "--quick", "--out", str(tmp_path))
    assert "KD" in out and "CE only" in out
    with open(tmp_path / "digits.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["teacher", "ce", "kd"]
    for r in rows:
        assert 0.0 <= float(r["mean_acc"]) <= 1.0
    assert (tmp_path / "digits.png").stat().st_size > 1000


def test_digits_rejects_unknown_method(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "distill_digits.py"), "--methods", "nope",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0 and "unknown method" in done.stderr


def test_lm_quick(tmp_path):
    out = run("distill_lm.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    with open(tmp_path / "lm.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["table"] == "perplexity"]
    assert [r["model_or_shape"].split()[-1] for r in rows[1:]] == ["ce", "kd", "skd"]
    for r in rows:  # a byte-level model: perplexity between 1 and the vocabulary size (roughly)
        assert 1.0 < float(r["val_ppl"]) < 300.0
    assert "validation perplexity" in (tmp_path / "lm.md").read_text() and "skd" in out
