"""GSPO, GMPO, CISPO and SAPO (megarl/losses/peers.py) against float64 brute force written from their papers'
formulas, the gradient identities each one claims, and micro-batch invariance."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.losses import LossInput, build_loss

MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
ADV = [1.5, -0.7, 0.4, -1.2]


def make_input(scale: float = 0.3, seed: int = 0) -> LossInput:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 4, generator=g, dtype=torch.float64) - 0.3
    lp = (old + scale * torch.randn(4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor(MASK, dtype=torch.float64)
    return LossInput(logprobs=lp, mask=mask, old_logprobs=old,
                     advantages=torch.tensor(ADV, dtype=torch.float64)[:, None] * mask)


def lr(inp, b, t):
    return float(inp.logprobs[b, t].detach() - inp.old_logprobs[b, t])


def valid(b):
    return [t for t in range(4) if MASK[b][t]]


def brute(name: str, inp: LossInput, hp: dict) -> float:
    """The loss by loops over responses and tokens, from each paper's formula."""
    per_seq = []
    for b, a in enumerate(ADV):
        ts = valid(b)
        if name == "gspo":
            s = math.exp(sum(lr(inp, b, t) for t in ts) / len(ts))
            per_seq.append(max(-a * s, -a * min(max(s, 1 - hp["clip_low"]), 1 + hp["clip_high"])))
        elif name == "gmpo":
            sg = 1.0 if a > 0 else -1.0
            clipped = [sg * min(sg * lr(inp, b, t), sg * min(max(lr(inp, b, t), -0.4), 0.4)) for t in ts]
            per_seq.append(-a * math.exp(sum(clipped) / len(ts)))
        elif name == "sapo":
            tau = 1.0 if a > 0 else 1.05
            gate = [4 / tau / (1 + math.exp(-tau * (math.exp(lr(inp, b, t)) - 1))) for t in ts]
            per_seq.append(sum(-g * a for g in gate) / len(ts))
        elif name == "cispo":  # token-mean: return the token sum here, divided below
            per_seq.append(sum(-min(max(math.exp(lr(inp, b, t)), 0.0), 1.28) * a * float(inp.logprobs[b, t].detach())
                               for t in ts))
    if name == "cispo":
        return sum(per_seq) / sum(map(sum, MASK))
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("name", ["gspo", "gmpo", "cispo", "sapo"])
@pytest.mark.parametrize("scale", [0.0, 0.3, 1.5])
def test_value_matches_brute_force(name, scale):
    inp = make_input(scale)
    loss = build_loss(name)
    assert float(loss(inp)[0].detach()) == pytest.approx(brute(name, inp, loss.hparams), rel=1e-12, abs=1e-14)


def test_gspo_gradient_is_the_sequence_objectives():
    """GSPO-token's gradient equals that of -mean_i min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean_t lr) taken
    fully differentiable (the paper's sequence-level objective), with a wide clip and with the paper's narrow one."""
    for clip in (dict(clip_low=0.5, clip_high=0.5), {}):
        a, b = make_input(0.05), make_input(0.05)
        build_loss("gspo", **clip)(a)[0].backward()
        m, adv = b.mask, torch.tensor(ADV, dtype=torch.float64)
        s = torch.exp(((b.logprobs - b.old_logprobs) * m).sum(-1) / m.sum(-1))
        lo, hi = 1 - clip.get("clip_low", 3e-4), 1 + clip.get("clip_high", 4e-4)
        torch.maximum(-adv * s, -adv * s.clamp(lo, hi)).mean().backward()
        torch.testing.assert_close(a.logprobs.grad, b.logprobs.grad * m, rtol=1e-10, atol=1e-14)
    rows = a.logprobs.grad.abs().sum(-1)  # with the paper's narrow clip some responses are clipped, some not
    assert (rows == 0).any() and (rows > 0).any()
    c = make_input(0.0)  # on-policy every response is inside it: the gradient is -A * mean_t grad log pi / N
    build_loss("gspo")(c)[0].backward()
    expected = -torch.tensor(ADV, dtype=torch.float64)[:, None] / c.mask.sum(-1, keepdim=True) / 4 * c.mask
    torch.testing.assert_close(c.logprobs.grad, expected)


def test_cispo_keeps_every_tokens_gradient():
    """d L / d log pi_t = -clip(rho_t) * A / N_tokens, also where rho is clipped (PPO would give 0 there)."""
    inp = make_input(1.5)
    build_loss("cispo")(inp)[0].backward()
    rho = torch.exp(inp.logprobs.detach() - inp.old_logprobs)
    adv = torch.tensor(ADV, dtype=torch.float64)[:, None]
    expected = -rho.clamp(max=1.28) * adv / inp.mask.sum() * inp.mask
    torch.testing.assert_close(inp.logprobs.grad, expected)
    assert ((rho > 1.28) & (inp.mask > 0)).any()  # some tokens are clipped and still carry a gradient


def test_sapo_gradient_is_the_soft_gate_and_equals_ppo_on_policy():
    inp = make_input(0.4)
    build_loss("sapo")(inp)[0].backward()
    rho = torch.exp(inp.logprobs.detach() - inp.old_logprobs)
    adv = torch.tensor(ADV, dtype=torch.float64)[:, None]
    tau = torch.where(adv > 0, 1.0, 1.05)
    sig = torch.sigmoid(tau * (rho - 1))
    expected = -adv * 4 * sig * (1 - sig) * rho / inp.mask.sum(-1, keepdim=True) / 4 * inp.mask
    torch.testing.assert_close(inp.logprobs.grad, expected)
    a, b = make_input(0.0), make_input(0.0)
    build_loss("sapo")(a)[0].backward()
    build_loss("grpo", kl_coef=0.0, agg_mode="seq-mean-token-mean")(b)[0].backward()
    torch.testing.assert_close(a.logprobs.grad, b.logprobs.grad)


def test_gmpo_gradient_on_unclipped_tokens():
    """d L / d log pi_t = -A_i * ratio_i / |y_i| / N_seqs where token t is inside the log-space clip, else 0."""
    inp = make_input(0.3)
    build_loss("gmpo")(inp)[0].backward()
    lrs = (inp.logprobs.detach() - inp.old_logprobs) * inp.mask
    adv = torch.tensor(ADV, dtype=torch.float64)[:, None]
    n = inp.mask.sum(-1, keepdim=True)
    sign = torch.sign(adv)
    kept = sign * torch.minimum(sign * lrs, sign * lrs.clamp(-0.4, 0.4))
    ratio = torch.exp((kept * inp.mask).sum(-1, keepdim=True) / n)
    # the min picks the unclamped lr (gradient flows) unless clamping made it smaller in the sign's direction
    active = (sign * lrs <= sign * lrs.clamp(-0.4, 0.4)) & (inp.mask > 0)
    expected = torch.where(active, -adv * ratio / n / 4, torch.zeros_like(lrs))
    torch.testing.assert_close(inp.logprobs.grad, expected)


@pytest.mark.parametrize("name", ["gspo", "gmpo", "cispo", "sapo"])
def test_micro_batch_invariance(name):
    loss = build_loss(name, kl_coef=0.01)
    whole = make_input(0.3)
    whole.ref_logprobs = whole.old_logprobs - 0.1
    full = float(loss(whole)[0].detach())
    parts = [LossInput(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in vars(whole).items()})
             for rows in ([0, 3], [1], [2])]
    counts = {k: sum(loss.counts(p)[k] for p in parts) for k in loss.counts(whole)}
    summed = sum(float(loss(LossInput(**{**vars(p), "counts": counts}))[0].detach()) for p in parts)
    assert summed == pytest.approx(full, rel=1e-12)
