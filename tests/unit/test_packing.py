"""Packing and token balancing (megarl/rollout/packing.py) against brute force: every sample placed once, bins
within budget, bin counts and balance within the algorithms' proven bounds of the optimum; packed micro-batches
address exactly the tokens that right-padded ones do, with far less padding on long-tailed lengths."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from megarl.rollout.batch import Rollouts, make_micro_batches
from megarl.rollout.packing import balanced_partition, first_fit_decreasing, make_packed_micro_batches


def optimal_bins(sizes: list[int], capacity: int) -> int:
    """The fewest bins, by trying every assignment of items to k bins for k = 1, 2, ..."""
    for k in range(1, len(sizes) + 1):
        for assign in itertools.product(range(k), repeat=len(sizes)):
            loads = [0] * k
            for s, b in zip(sizes, assign):
                loads[b] += s
            if max(loads) <= capacity:
                return k
    return len(sizes)


def optimal_makespan(sizes: list[int], parts: int) -> int:
    return min(max(sum(s for s, a in zip(sizes, assign) if a == p) for p in range(parts))
               for assign in itertools.product(range(parts), repeat=len(sizes)))


@pytest.mark.parametrize("seed", range(12))
def test_first_fit_decreasing_is_valid_and_within_its_bound(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 10) for _ in range(rng.randint(1, 7))]
    bins = first_fit_decreasing(sizes, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 10 for b in bins)
    assert len(bins) <= 11 / 9 * optimal_bins(sizes, 10) + 6 / 9
    assert first_fit_decreasing([15, 3], 10) == [[0], [1]]  # an item over the budget gets a bin of its own


@pytest.mark.parametrize("seed", range(12))
def test_balanced_partition_is_within_four_thirds_of_the_optimum(seed):
    rng = random.Random(100 + seed)
    parts = rng.choice([2, 3])
    sizes = [rng.randint(1, 50) for _ in range(rng.randint(parts, 7))]
    deal = balanced_partition(sizes, parts)
    assert sorted(i for d in deal for i in d) == list(range(len(sizes)))
    worst = max(sum(sizes[i] for i in d) for d in deal)
    assert worst <= (4 / 3 - 1 / (3 * parts)) * optimal_makespan(sizes, parts) + 1e-9


def long_tailed(seed: int, groups: int = 8, n: int = 4) -> Rollouts:
    """Log-normal response lengths (median ~20, max several times that), prompts of 10-30 tokens."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(groups):
        p = [rng.randrange(1, 300) for _ in range(rng.randint(10, 30))]
        for _ in range(n):
            prompts.append(p)
            responses.append([rng.randrange(1, 300) for _ in range(max(1, min(200, int(rng.lognormvariate(3, 1)))))])
    return Rollouts(prompts, responses, [[0.0] * len(r) for r in responses], ["stop"] * len(responses),
                    torch.arange(groups).repeat_interleave(n))


@pytest.mark.parametrize("whole_groups", [False, True])
def test_packed_micro_batches_address_the_same_tokens_with_less_padding(whole_groups):
    ro = long_tailed(3)
    packed = make_packed_micro_batches(ro, ro.groups(), 512, whole_groups=whole_groups)
    padded = make_micro_batches(ro, ro.groups(), 512)
    assert sorted(r for mb in packed for r in mb.rows) == list(range(len(ro)))
    assert len({tuple(mb.input_ids.shape) for mb in packed}) == 1  # one shape for the pipeline
    for mb in packed:
        flat = mb.input_ids.view(-1)
        for r, row in enumerate(mb.rows):
            y, n = ro.response_ids[row], len(ro.response_ids[row])
            assert flat[mb.resp_positions[r, :n] + 1].tolist() == y  # the output at a position predicts the next
            assert mb.resp_tokens[r, :n].tolist() == y and mb.mask[r].sum() == n
        cu = mb.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == mb.input_ids.shape[1] and mb.tokens == cu[len(mb.rows)]
        for a, b in zip(cu, cu[1:]):  # positions restart in every segment
            assert mb.position_ids[0, a:b].tolist() == list(range(b - a))
        if whole_groups:
            assert all(set(g) <= set(mb.rows) or not set(g) & set(mb.rows) for g in ro.groups())
    waste = lambda mbs: 1 - sum(mb.tokens for mb in mbs) / sum(mb.input_ids.numel() for mb in mbs)  # noqa: E731
    assert waste(padded) > 0.5 and waste(packed) < 0.25, (waste(padded), waste(packed))


@pytest.mark.parametrize("packed", [False, True])
def test_micro_batch_lengths_round_up_to_a_multiple_and_address_the_same_tokens(packed):
    """Sequence parallelism splits every micro-batch over the TP ranks: ``multiple`` pads its length (packed: with
    tail segments of their own; with ``align``, their lengths stay multiples of it), the tokens stay where they were."""
    ro = long_tailed(5)
    for multiple, align in ((3, 1), (4, 2), (8, 4)):
        mbs = make_packed_micro_batches(ro, ro.groups(), 512, align=align, multiple=multiple) if packed else \
            make_micro_batches(ro, ro.groups(), 512, multiple=multiple)
        plain = make_packed_micro_batches(ro, ro.groups(), 512, align=align) if packed else \
            make_micro_batches(ro, ro.groups(), 512)
        for mb, ref in zip(mbs, plain, strict=True):
            s, s_ref = mb.input_ids.shape[1], ref.input_ids.shape[1]
            assert s % multiple == 0 and s_ref <= s < s_ref + multiple * align
            assert mb.rows == ref.rows and torch.equal(mb.resp_tokens, ref.resp_tokens)
            flat = mb.input_ids.view(-1)
            for r, row in enumerate(mb.rows):
                n = len(ro.response_ids[row])
                assert flat[mb.resp_positions[r, :n] + 1].tolist() == ro.response_ids[row]
            if packed:
                cu = mb.cu_seqlens.tolist()
                assert cu[-1] == s and all((b - a) % align == 0 for a, b in zip(cu, cu[1:]))
                assert cu[:len(mb.rows) + 1] == ref.cu_seqlens.tolist()[:len(mb.rows) + 1]


def test_concat_then_select_gives_back_each_part():
    a, b = long_tailed(1, groups=2), long_tailed(2, groups=3)
    b.group_ids += 10
    a.advantages = torch.randn(len(a), a.max_response_len)
    b.advantages = torch.randn(len(b), b.max_response_len)
    both = Rollouts.concat([a, b])
    back = both.select(list(range(len(a), len(a) + len(b))))
    assert back.response_ids == b.response_ids and torch.equal(back.group_ids, b.group_ids)
    assert torch.equal(back.advantages[:, :b.max_response_len], b.advantages)
    # a part without rows (dynamic sampling kept none of a round's groups) neither drops a field nor adds rows;
    # when no part has rows the fields are empty tensors, not None
    b.rewards, a.rewards = torch.randn(len(b)), None
    kept = Rollouts.concat([b.select([]), b])
    assert torch.equal(kept.rewards, b.rewards) and kept.response_ids == b.response_ids
    assert Rollouts.concat([a, b]).rewards is None
    empty = Rollouts.concat([b.select([]), b.select([])])
    assert len(empty) == 0 and empty.rewards is not None and empty.rewards.shape == (0,)
