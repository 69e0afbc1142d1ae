"""The native KV-cache generator at TP=2, PP=2 and EP=2 under torchrun (see worker_generate.py)."""

import pytest

from tests.parallel.launch import torchrun

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_generator_at_layout(tp, pp):
    out = torchrun("tests/parallel/worker_generate.py", tp * pp, "--tp", str(tp), "--pp", str(pp))
    assert out.count("greedy == HF, sampled log-probs consistent") == 2


def test_generator_at_ep2_with_uneven_prompts_per_rank():
    """Experts split over two ranks that generate different prompts (worker_generate.py --ep 2); the allgather
    dispatcher, which gloo cannot run with uneven token counts, refused by name."""
    out = torchrun("tests/parallel/worker_generate.py", 2, "--ep", "2", timeout=300)
    assert out.count("greedy == HF on uneven prompts; allgather refused on gloo") == 2
