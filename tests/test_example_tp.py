"""examples/distill_lm_tp.py runs end to end in its --quick mode on 2 gloo ranks (torch.distributed.run
--standalone: rendezvous on localhost with a free port) and its tensor-parallel loss equals the
single-process one."""
import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available (the example runs on gloo)")


@pytest.mark.parametrize("split", ["even", "150,106"])
def test_tp_example_quick(split):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           os.path.join(ROOT, "examples", "distill_lm_tp.py"), "--quick", "--no-reference",
                           "--split", split],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"TP check .*\|difference\| [0-9.e+-]+ .*-> PASSED", out), out
    assert "vocabulary 256 split " + ("[128, 128]" if split == "even" else "[150, 106]") in out
    assert out.count("bodies' gradients identical on all ranks: max |g_r - g_0| = 0.0e+00") == 4  # 20 steps, every 5
    ppl = float(re.search(r"final validation perplexity \(vocabulary-parallel CE\): ([0-9.]+)", out).group(1))
    assert 1.0 < ppl < 300.0
