"""The native KV-cache generator at TP=2 and PP=2 under torchrun (see worker_generate.py)."""

import pytest

from tests.parallel.launch import torchrun

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_generator_at_layout(tp, pp):
    out = torchrun("tests/parallel/worker_generate.py", tp * pp, "--tp", str(tp), "--pp", str(pp))
    assert out.count("greedy == HF, sampled log-probs consistent") == 2
