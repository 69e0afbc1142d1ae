"""Advantage estimators, V*, dynamic sampling and overlong shaping against loops and hand-worked values."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megarl.advantages import compute_advantages, estimate_v_star
from megarl.rollout.shaping import dynamic_sampling_keep, overlong_penalty

R = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5, -1.0, 3.0]
G = [0, 0, 0, 0, 1, 1, 1, 2]  # group 2 has a single response


def batch():
    mask = torch.tensor([[1, 1, 1, 0]] * 4 + [[1, 0, 0, 0]] * 2 + [[1, 1, 1, 1]] * 2, dtype=torch.float64)
    return torch.tensor(R, dtype=torch.float64), torch.tensor(G), mask


def groups():
    out = {}
    for i, g in enumerate(G):
        out.setdefault(g, []).append(i)
    return out


def per_seq_expect(name):
    out = [0.0] * len(R)
    for idx in groups().values():
        rs = [R[i] for i in idx]
        for i in idx:
            if name == "grpo":
                mean, std = (statistics.mean(rs), statistics.stdev(rs)) if len(rs) > 1 else (0.0, 1.0)
                out[i] = (R[i] - mean) / (std + 1e-6)
            elif name in ("dr_grpo", "rpg"):
                out[i] = R[i] - (statistics.mean(rs) if len(rs) > 1 else 0.0)
            elif name == "rloo":
                others = [R[j] for j in idx if j != i]
                out[i] = R[i] - statistics.mean(others) if others else R[i]
    return out


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rpg", "rloo"])
def test_group_estimators_match_loops_and_broadcast_under_the_mask(name):
    r, g, m = batch()
    adv = compute_advantages(name, rewards=r, group_ids=g, mask=m)
    expect = torch.tensor(per_seq_expect(name), dtype=torch.float64)[:, None] * m
    torch.testing.assert_close(adv, expect, rtol=1e-12, atol=1e-12)


def whiten_loop(values_per_token):
    vals = [v for v, valid in values_per_token if valid]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return [((v - mean) / math.sqrt(var + 1e-8)) if valid else 0.0 for v, valid in values_per_token]


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_batch_whitened_estimators_match_loop(name):
    r, g, m = batch()
    base = R if name == "reinforce_pp" else per_seq_expect("dr_grpo")
    flat = [(base[b], bool(m[b, t])) for b in range(m.shape[0]) for t in range(m.shape[1])]
    expect = torch.tensor(whiten_loop(flat), dtype=torch.float64).reshape(m.shape)
    adv = compute_advantages(name, rewards=r, group_ids=g, mask=m)
    torch.testing.assert_close(adv, expect, rtol=1e-10, atol=1e-12)
    assert abs(float((adv * m).sum())) < 1e-9  # zero token-weighted mean


def test_unknown_and_missing_inputs_are_named():
    r, g, m = batch()
    with pytest.raises(ValueError, match=r"Did you mean 'grpo'"):
        compute_advantages("grpp", rewards=r, group_ids=g, mask=m)
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("grpo", rewards=r, mask=m)


def test_v_star_hand_values():
    v = estimate_v_star(torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]), beta1=0.5)
    assert v[0].item() == pytest.approx(0.5 * math.log((1 + math.e ** 2) / 2), rel=1e-14)
    assert v[0].item() == pytest.approx(0.7169, abs=1e-4)
    assert v[1].item() == pytest.approx(1.0) and v[2].item() == pytest.approx(0.0)
    assert estimate_v_star(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), beta1=0.0).item() == pytest.approx(0.75)
    assert estimate_v_star(torch.tensor([[0.0, 1.0]]), beta1=-1.0).item() == 0.0
    # beta1 -> 0+ tends to the max, large beta1 to the mean
    assert estimate_v_star(torch.tensor([[0.0, 1.0]]), beta1=1e-3).item() == pytest.approx(1 - 1e-3 * math.log(2))
    assert estimate_v_star(torch.tensor([[0.0, 1.0]]), beta1=1e4).item() == pytest.approx(0.5, abs=1e-4)


def test_dynamic_sampling_keeps_groups_with_spread_and_singletons():
    acc = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 1])
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])
    keep = dynamic_sampling_keep(acc, gid)
    assert keep.tolist() == [False, False, True, True, False, False, False, False, True]


def test_overlong_penalty_hand_values():
    pen = overlong_penalty(torch.tensor([100, 1536, 1792, 2048, 2100]), max_len=2048, buffer_len=512)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -564 / 512], dtype=torch.float64))
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([1]), max_len=10, buffer_len=0)
