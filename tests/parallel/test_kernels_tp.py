"""Vocab-parallel log-prob/entropy at TP=2 under torchrun, against a float64 oracle (see worker_kernels.py)."""

import pytest

from tests.parallel.launch import torchrun

pytestmark = pytest.mark.dist


def test_every_kernel_at_tp2():
    out = torchrun("tests/parallel/worker_kernels.py", 2)
    for impl in ("torch", "triton"):
        assert out.count(f"{impl}: values and logits-shard gradient match") == 2
    assert out.count("fused_linear: values, hidden and weight-shard gradients match") == 2
    assert out.count("fused_linear triton chunks: values, hidden and weight-shard gradients match") == 2
