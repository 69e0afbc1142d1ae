"""Multi-node bootstrap on one machine: two torchrun "nodes" (--nnodes 2, static env:// rendezvous over
localhost) forming one TP=2 group across them; and a parallel job whose ranks fail exits instead of hanging."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.parallel.launch import REPO, torchrun, torchrun_nodes

pytestmark = pytest.mark.dist


def test_two_nodes_one_tensor_parallel_group(tmp_path):
    outs = torchrun_nodes("tests/parallel/worker_parity.py", 2, "--tp", "2", "--pp", "1", "--out", str(tmp_path),
                          "--families", "llama,qwen3", timeout=300)
    # each node's single rank is one half of the TP group, and each checked logits and gradients against HF
    for out in outs:
        assert "[tp2 pp1] llama: logits max|diff| vs HF" in out and "[tp2 pp1] qwen3" in out


def test_failing_parallel_job_exits_with_an_error(tmp_path):
    from megarl.convert.tiny import tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "megarl.cli", "convert", "hf-to-mcore", str(tmp_path / "hf"),
                        str(tmp_path / "mcore")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(AssertionError) as e:  # every rank raises the same user error; nobody waits forever
        torchrun("megarl.cli", 2, "convert", "verify", str(tmp_path / "hf"), str(tmp_path / "mcore"), "--tp", "2",
                 "--tol", "1e-12", timeout=300)
    assert "exitcode: 2" in str(e.value) and "exceeds the tolerance" in str(e.value)
