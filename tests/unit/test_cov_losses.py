"""Clip-Cov and KL-Cov (megarl/losses/cov.py) against brute force from the paper's definitions (arXiv 2505.22617,
as verl runs them): the covariance, which tokens each selects, the loss values and gradients, and micro-batch
invariance once the step's selection is passed in."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.losses import LossInput, build_loss
from megarl.losses.cov import clip_cov_select, covariance, kl_cov_select

B, T = 6, 5


def make_input(seed: int = 0) -> LossInput:
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    lp = (old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    mask = (torch.arange(T)[None, :] < torch.tensor([5, 4, 5, 2, 3, 5])[:, None]).double()
    adv = torch.tensor([2.0, -1.5, 0.5, 1.8, -2.2, 0.1], dtype=torch.float64)[:, None] * mask
    return LossInput(logprobs=lp, mask=mask, old_logprobs=old, advantages=adv)


def brute_cov(inp: LossInput) -> dict[tuple[int, int], float]:
    cells = [(b, t) for b in range(B) for t in range(T) if inp.mask[b, t] > 0]
    ma = sum(float(inp.advantages[c]) for c in cells) / len(cells)
    ml = sum(float(inp.old_logprobs[c]) for c in cells) / len(cells)
    return {c: (float(inp.advantages[c]) - ma) * (float(inp.old_logprobs[c]) - ml) for c in cells}


def test_covariance_matches_brute_force():
    inp = make_input()
    cov = covariance(inp.old_logprobs, inp.advantages, inp.mask)
    for c, v in brute_cov(inp).items():
        assert float(cov[c]) == pytest.approx(v, rel=1e-12)
    assert torch.isneginf(cov[inp.mask == 0]).all()


def test_kl_cov_penalises_the_top_covariance_tokens():
    inp = make_input()
    hp = dict(select_ratio=0.1, ppo_kl_coef=1.0)
    sel = kl_cov_select(covariance(inp.old_logprobs, inp.advantages, inp.mask), inp.mask, hp)
    ranked = sorted(brute_cov(inp).items(), key=lambda kv: -kv[1])
    n = max(1, int(0.1 * len(ranked)))  # 24 valid tokens -> 2
    assert {c for c, _ in ranked[:n]} == {tuple(i) for i in sel.nonzero().tolist()} and n == 2
    loss, _ = build_loss("kl_cov", **hp)(inp)
    total = 0.0
    for (b, t) in brute_cov(inp):
        lr = float(inp.logprobs[b, t].detach() - inp.old_logprobs[b, t])
        total += -float(inp.advantages[b, t]) * math.exp(lr) + (abs(lr) if sel[b, t] else 0.0)
    assert float(loss.detach()) == pytest.approx(total / 24, rel=1e-12)


def test_clip_cov_drops_the_gradient_of_chosen_tokens_only():
    inp = make_input()
    hp = dict(select_ratio=0.1, cov_lb=0.2, cov_ub=5.0)
    cov = covariance(inp.old_logprobs, inp.advantages, inp.mask)
    sel = clip_cov_select(cov, inp.mask, hp, torch.Generator().manual_seed(1))
    candidates = {c for c, v in brute_cov(inp).items() if 0.2 < v < 5.0}
    chosen = {tuple(i) for i in sel.nonzero().tolist()}
    assert len(candidates) > 2 and len(chosen) == 2 and chosen <= candidates
    same = clip_cov_select(cov, inp.mask, hp, torch.Generator().manual_seed(1))
    assert torch.equal(sel, same)  # seeded: a resumed run draws the same tokens
    inp.selected = sel
    loss, _ = build_loss("clip_cov", **hp)(inp)
    loss.backward()
    ref = make_input()  # the same loss without Clip-Cov: the dual-clip PPO loss with the recipe's wide clip
    build_loss("grpo", clip_low=1.0, clip_high=1.0, clip_c=10.0, kl_coef=0.0)(ref)[0].backward()
    torch.testing.assert_close(inp.logprobs.grad, ref.logprobs.grad * (1 - sel))


def test_no_candidate_selects_nothing():
    inp = make_input()
    cov = covariance(inp.old_logprobs, inp.advantages, inp.mask)
    assert clip_cov_select(cov, inp.mask, dict(select_ratio=0.5, cov_lb=50.0, cov_ub=60.0)).sum() == 0


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_micro_batch_invariance_with_the_steps_selection(name):
    loss = build_loss(name, select_ratio=0.2, **({"cov_lb": 0.0} if name == "clip_cov" else {}))
    whole = make_input()
    cov = covariance(whole.old_logprobs, whole.advantages, whole.mask)
    whole.selected = loss.spec.select(cov, whole.mask, loss.hparams, torch.Generator().manual_seed(0))
    assert whole.selected.sum() > 0
    full = float(loss(whole)[0].detach())
    parts = [LossInput(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in vars(whole).items()})
             for rows in ([0, 5], [1, 2], [3, 4])]
    counts = {k: sum(loss.counts(p)[k] for p in parts) for k in loss.counts(whole)}
    summed = sum(float(loss(LossInput(**{**vars(p), "counts": counts}))[0].detach()) for p in parts)
    assert summed == pytest.approx(full, rel=1e-12)
