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


def test_packed_segments_are_aligned_and_split_segment_by_segment():
    """With align = 2 cp every packed segment (samples and the padding tail) is a multiple of 2 cp long, each
    sample's tokens at its segment's start; each rank holds chunks r and 2cp-1-r of every segment."""
    from megarl.backends.megatron.context_parallel import held_positions
    from megarl.rollout.packing import make_packed_micro_batches
    from tests.unit.test_packed_forward import rollouts

    ro, cp = rollouts(), 2
    mbs = make_packed_micro_batches(ro, ro.groups(), 48, align=2 * cp)
    assert sorted(r for mb in mbs for r in mb.rows) == list(range(len(ro)))
    for mb in mbs:
        cu = mb.cu_seqlens.tolist()
        assert all((b - a) % (2 * cp) == 0 for a, b in zip(cu, cu[1:])) and cu[-1] == mb.input_ids.shape[1]
        for j, i in enumerate(mb.rows):
            sample = ro.prompt_ids[i] + ro.response_ids[i]
            assert mb.input_ids[0, cu[j]:cu[j] + len(sample)].tolist() == sample
        assert mb.tokens == sum(len(ro.prompt_ids[i]) + len(ro.response_ids[i]) for i in mb.rows)
        held = [held_positions(cu[-1], cu, cp, r).tolist() for r in range(cp)]
        assert sorted(held[0] + held[1]) == list(range(cu[-1]))
        for a, b in zip(cu, cu[1:]):
            c = (b - a) // (2 * cp)
            for r in range(cp):
                want = [*range(a + r * c, a + (r + 1) * c), *range(a + (2 * cp - 1 - r) * c, a + (2 * cp - r) * c)]
                assert [p for p in held[r] if a <= p < b] == want
    assert make_packed_micro_batches(ro, ro.groups(), 48)[0].cu_seqlens.tolist() != mbs[0].cu_seqlens.tolist()


@pytest.mark.parametrize("cp", [2, 3])
def test_packed_plan_batches_segments_into_each_segments_own_causal_attention(cp):
    """The packed plan's batched calls (near-equal segments share one, right-padded) give every local query the
    softmax-weighted values of exactly the keys of its own segment at or before its true position: brute force,
    query by query, on every rank."""
    from megarl.backends.megatron.context_parallel import _packed_plan, held_positions

    g = torch.Generator().manual_seed(0)
    lengths = [2 * cp * n for n in (1, 7, 6, 6, 2, 13, 1, 7)]  # equal ones batch together, a long one alone
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    t, d = cu[-1], 5
    q_all, k_all, v_all = (torch.randn(t, d, generator=g, dtype=torch.float64) for _ in range(3))
    seg_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos_in_seg = torch.cat([torch.arange(n) for n in lengths])
    for rank in range(cp):
        held = held_positions(t, cu, cp, rank)  # this rank's tokens, in its local order
        plan = _packed_plan(cu, cp, rank, torch.device("cpu"))
        assert len(plan.buckets) < len(lengths)  # some segments share a call
        q = q_all[held]
        outs = []
        for qg, kg, masked in plan.buckets:
            scores = torch.einsum("qkd,skd->kqs", q[qg], k_all[kg]).masked_fill(masked[:, 0], float("-inf"))
            outs.append(torch.einsum("kqs,skd->qkd", scores.softmax(-1), v_all[kg]).reshape(-1, d))
        got = torch.cat(outs)[plan.inverse]
        for row, p in enumerate(held.tolist()):
            seen = (seg_of == seg_of[p]) & (pos_in_seg <= pos_in_seg[p])
            w = (k_all[seen] @ q_all[p]).softmax(0)
            torch.testing.assert_close(got[row], w @ v_all[seen], rtol=1e-12, atol=1e-12)
