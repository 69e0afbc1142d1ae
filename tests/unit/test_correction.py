"""Rollout correction (megarl/losses/correction.py) against float64 brute force written from verl's semantics
(docs/rollout_correction.md): truncated IS weights per token / sequence, rejection per token / sequence /
geometric mean that leaves the loss and its normalisers, micro-batch invariance, the step metrics; and the two
mends of issue 20 that live in the losses (RPG fkl without the clamp, seq-mean over non-empty rows)."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.losses import LossInput, build_loss
from megarl.losses.correction import CORRECTION_DEFAULTS, finish_stats, stats

# 3 responses x 4 tokens; the last row has 2 valid tokens. old - rollout per token (the mismatch):
LR = [[0.1, -0.2, 0.9, 0.05], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.3, 0.0, 0.0]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
ADV = [1.0, -0.5, 2.0]


def make_input(seed: int = 0) -> LossInput:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.5
    lp = (old + 0.1 * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor(MASK, dtype=torch.float64)
    return LossInput(logprobs=lp, mask=mask, old_logprobs=old,
                     rollout_logprobs=old - torch.tensor(LR, dtype=torch.float64),
                     advantages=torch.tensor(ADV).double()[:, None] * mask, group_ids=torch.tensor([0, 0, 1]))


def brute_grpo(inp: LossInput, weight, keep) -> float:
    """token-mean of weight * dual-clip PPO loss over kept tokens, by loops (eps 0.2, c 3, no KL)."""
    total, n = 0.0, 0
    for b in range(3):
        for t in range(4):
            if not MASK[b][t] or not keep(b, t):
                continue
            rho = math.exp(float(inp.logprobs[b, t].detach() - inp.old_logprobs[b, t]))
            a = ADV[b]
            l = max(-a * rho, -a * min(max(rho, 0.8), 1.2))
            if a < 0:
                l = min(l, -a * 3.0)
            total, n = total + weight(b, t) * l, n + 1
    return total / n


def seq_sum(b):
    return sum(LR[b][t] for t in range(4) if MASK[b][t])


def n_valid(b):
    return sum(MASK[b])


CASES = {  # (overrides, weight(b, t), keep(b, t)) with the default thresholds 2.0 and [0.5, 2.0]
    "token IS": ({"rollout_is": "token"}, lambda b, t: min(math.exp(LR[b][t]), 2.0), lambda b, t: True),
    "sequence IS": ({"rollout_is": "sequence"}, lambda b, t: min(math.exp(seq_sum(b)), 2.0), lambda b, t: True),
    "token RS": ({"rollout_rs": "token"}, lambda b, t: 1.0, lambda b, t: 0.5 <= math.exp(LR[b][t]) <= 2.0),
    "sequence RS": ({"rollout_rs": "sequence"}, lambda b, t: 1.0, lambda b, t: 0.5 <= math.exp(seq_sum(b)) <= 2.0),
    "geometric RS": ({"rollout_rs": "geometric", "rollout_rs_threshold": 1.2, "rollout_rs_threshold_lower": 0.8},
                     lambda b, t: 1.0, lambda b, t: 0.8 <= math.exp(seq_sum(b) / n_valid(b)) <= 1.2),
    "token IS + geometric RS": ({"rollout_is": "token", "rollout_rs": "geometric", "rollout_rs_threshold": 1.2,
                                 "rollout_rs_threshold_lower": 0.8}, lambda b, t: min(math.exp(LR[b][t]), 2.0),
                                lambda b, t: 0.8 <= math.exp(seq_sum(b) / n_valid(b)) <= 1.2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_with_correction_matches_brute_force(case):
    over, weight, keep = CASES[case]
    inp = make_input()
    loss, _ = build_loss("grpo", kl_coef=0.0, **over)(inp)
    assert float(loss.detach()) == pytest.approx(brute_grpo(inp, weight, keep), rel=1e-12)
    assert any(not keep(b, t) for b in range(3) for t in range(4) if MASK[b][t]) == ("RS" in case)


def test_the_cases_reject_something_and_truncate_something():
    """The fixture exercises both sides: token 0.9 -> e^0.9 = 2.46 is truncated to 2 and rejected by token RS."""
    assert math.exp(LR[0][2]) > 2.0 and CASES["token RS"][2](0, 2) is False
    assert CASES["geometric RS"][2](2, 0) is False and CASES["geometric RS"][2](1, 0) is True


def test_is_weights_are_detached_and_scale_the_gradient():
    """grad(loss with token IS) = w * grad(loss without), token by token (w is a constant of the update)."""
    a, b = make_input(), make_input()
    build_loss("grpo", kl_coef=0.0, rollout_is="token")(a)[0].backward()
    build_loss("grpo", kl_coef=0.0)(b)[0].backward()
    w = torch.exp(torch.tensor(LR, dtype=torch.float64)).clamp(max=2.0) * torch.tensor(MASK).double()
    torch.testing.assert_close(a.logprobs.grad, w * b.logprobs.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo", "trw_triangular", "rpg_rkl", "rpg_rf_fkl_clip",
                                  "reinforce_pp"])
def test_rejection_is_micro_batch_invariant(name):
    """Rejected tokens leave the normalisers too: the sum over micro-batches with global counts equals the whole."""
    loss = build_loss(name, rollout_rs="geometric", rollout_rs_threshold=1.3, rollout_rs_threshold_lower=0.75,
                      rollout_is="token", **({"kl_coef": 0.0} if "kl_coef" in build_loss(name).hparams else {}))
    whole = make_input()
    full, _ = loss(whole)
    parts = [LossInput(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in vars(whole).items()})
             for rows in ([0], [1, 2])]
    counts = {k: sum(loss.counts(p)[k] for p in parts) for k in loss.counts(whole)}
    assert counts == loss.counts(whole) and counts["seqs"] == 2  # row 2 (e^-0.35) rejected: not a sequence
    summed = sum(loss(LossInput(**{**vars(p), "counts": counts}))[0] for p in parts)
    assert float(summed.detach()) == pytest.approx(float(full.detach()), rel=1e-12)


def test_trpa_and_astar_po_refuse_token_weights_and_take_rejection():
    with pytest.raises(ValueError, match="no per-token policy-gradient term"):
        build_loss("trpa", rollout_is="token")
    with pytest.raises(ValueError, match="rollout_is in \\('none', 'sequence'\\)"):
        build_loss("astar_po", rollout_is="token")
    inp = make_input()
    inp.ref_logprobs, inp.levels = inp.old_logprobs, torch.tensor([1, 2, 1])
    inp.group_ids = torch.tensor([0, 0, 0])
    _, m = build_loss("trpa", rollout_rs="sequence", rollout_rs_threshold=1.5,
                      rollout_rs_threshold_lower=0.4)(inp)  # row 0: e^0.85 > 1.5
    assert m["pairs"] == 1.0  # only (row 2 over row 1) is left; without rejection: 2 pairs
    assert build_loss("trpa")(inp)[1]["pairs"] == 2.0


@pytest.mark.parametrize("bad,message", [({"rollout_is": "tokn"}, "rollout_is='tokn'"),
                                         ({"rollout_rs": "seq"}, "rollout_rs='seq'"),
                                         ({"rollout_is_threshold": 0.0}, "must be > 0"),
                                         ({"rollout_rs_threshold_lower": 3.0}, "lower < upper")])
def test_bad_correction_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        build_loss("grpo", **bad)


def test_step_metrics_match_brute_force():
    inp = make_input()
    hp = {**CORRECTION_DEFAULTS, "rollout_is": "token", "rollout_rs": "sequence"}
    m = finish_stats(stats(inp.old_logprobs, inp.rollout_logprobs, inp.mask, hp))
    valid = [(b, t) for b in range(3) for t in range(4) if MASK[b][t]]
    k3 = [math.exp(LR[b][t]) - LR[b][t] - 1 for b, t in valid]
    w = [min(math.exp(LR[b][t]), 2.0) for b, t in valid]
    assert m["rollout_corr/k3_kl"] == pytest.approx(sum(k3) / len(valid), rel=1e-9)
    assert m["rollout_corr/log_ppl_diff"] == pytest.approx(sum(seq_sum(b) / n_valid(b) for b in range(3)) / 3)
    assert m["rollout_corr/is_weight_mean"] == pytest.approx(sum(w) / len(w), rel=1e-9)
    assert m["rollout_corr/is_weight_max"] == 2.0 and m["rollout_corr/is_truncated_frac"] == 1 / 10
    rejected = [b for b in range(3) if not 0.5 <= math.exp(seq_sum(b)) <= 2.0]  # e^0.85 = 2.34, e^-0.7 = 0.497
    assert rejected == [0, 2] and m["rollout_corr/rejected_seq_frac"] == pytest.approx(2 / 3)
    assert m["rollout_corr/rejected_token_frac"] == pytest.approx(6 / 10)


def test_rpg_fkl_has_a_gradient_past_the_clamp():
    """old = 0, logp = 25, A = 0: the forward-KL term -lw has gradient -beta per token (spec: no clamp)."""
    lp = torch.tensor([[25.0]], dtype=torch.float64, requires_grad=True)
    inp = LossInput(logprobs=lp, mask=torch.ones(1, 1), old_logprobs=torch.zeros(1, 1, dtype=torch.float64),
                    advantages=torch.zeros(1, 1, dtype=torch.float64))
    build_loss("rpg_fkl")(inp)[0].backward()
    assert float(lp.grad) == pytest.approx(-1e-4)


def test_seq_mean_counts_only_rows_with_tokens():
    """seq-mean-token-sum over [row of 2 tokens, empty row]: the sum over the one real sequence, not half of it."""
    lp = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    inp = LossInput(logprobs=lp, mask=mask, old_logprobs=torch.zeros(2, 2, dtype=torch.float64),
                    advantages=torch.ones(2, 2, dtype=torch.float64) * mask)
    loss, _ = build_loss("grpo", kl_coef=0.0, agg_mode="seq-mean-token-sum")(inp)
    assert float(loss.detach()) == pytest.approx(-2.0)  # -A * rho summed over 2 tokens, / 1 sequence
