"""The context-parallel layout (megarl/backends/megatron/context_parallel.py) against its definition, by brute
force: a sequence padded to a multiple of 2 cp, cut into 2 cp chunks, rank r holding chunks r and 2cp-1-r."""

from __future__ import annotations

import pytest
import torch

from megarl.backends.megatron.context_parallel import _natural_order, local_positions, padded_length


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_ranks_hold_chunks_r_and_mirror_and_equal_causal_work(cp):
    s = padded_length(37, cp)
    assert s % (2 * cp) == 0 and 37 <= s < 37 + 2 * cp
    c = s // (2 * cp)
    chunks = [list(range(i * c, (i + 1) * c)) for i in range(2 * cp)]
    held = [local_positions(s, cp, r).tolist() for r in range(cp)]
    for r in range(cp):
        assert held[r] == chunks[r] + chunks[2 * cp - 1 - r]
    assert sorted(p for h in held for p in h) == list(range(s))  # every position exactly once
    work = {sum(p + 1 for p in h) for h in held}  # causal attention: position p looks at p + 1 keys
    assert len(work) == 1, work


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_natural_order_undoes_the_rank_major_concatenation(cp):
    s = 8 * cp
    tokens = torch.arange(s) * 10
    gathered = torch.cat([tokens[local_positions(s, cp, r)] for r in range(cp)])  # what all_gather returns
    assert torch.equal(gathered[_natural_order(s, cp, "cpu")], tokens)
