"""TRW-GRPO: GRPO with explicit trust-region weights (docs/algorithms.md; xiaoojs20/tiny-grpo-exp@a7d4e97c README).

    L = -agg( sg(w(rho, A)) * rho * A ) + kl_coef * agg(k3(logp, logp_ref)),   rho = pi_theta / pi_old

w is stop-gradient, so grad L = -agg(w * A * rho * grad log pi). With the PPO indicator weight
``w = 1[A>0, rho<1+eps_h] + 1[A<0, 1-eps_l<rho<c]`` this is exactly the dual-clip PPO gradient (the unit test).

Departure from upstream: the TRW repo ships no code for any weight; every formula below is DERIVED from its
README (docs/algorithms.md has the reasoning):

- triangular: 0 outside [1-eps_l, 1+eps_h]; rises linearly w0 -> 1 on [1-eps_l, 1]; falls 1 -> w2 on [1, 1+eps_h].
  ``sign_aware=True`` applies the window only on the side PPO clips (upper for A>0, lower for A<0).
- logistic:   w = sigma(-alpha*|log rho|) * sigma(gamma*A) + eta   (w <= 0.5+eta; ``rescale=True`` multiplies the
  product by 4 so that w(rho=1, A=0) = 1, matching GRPO's effective step size).
- entropy:    w = w_triangular * (1 + lam * 1[A>0] * (1 - pi_old(y_t))): the README's "extra boost for rare but
  high-advantage actions", with rarity measured as 1 - pi_old(y_t) in [0, 1) -- bounded, and free of the
  vocabulary size that a surprisal / log|V| normalisation would need.
"""

from __future__ import annotations

import torch

from megarl.losses.base import LossInput, agg, counts_of, is_weighted, local_counts, masked_mean, require, token_mask
from megarl.losses.kl import kl_estimate
from megarl.losses.ppo import log_ratio


def grpo_indicator_weight(rho: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float,
                          clip_c: float) -> torch.Tensor:
    """The 0/1 weight under which TRW reproduces dual-clip PPO's gradient. [B, T]"""
    pos = (adv > 0) & (rho < 1.0 + clip_high)
    neg = (adv < 0) & (rho > 1.0 - clip_low) & (rho < clip_c)
    return (pos | neg).to(rho.dtype)


def triangular_weight(rho: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float, w0: float,
                      w2: float, sign_aware: bool = False) -> torch.Tensor:
    """Piecewise-linear trust-region weight (module docstring). [B, T]"""
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    rising = w0 + (1.0 - w0) * (rho - lo) / clip_low
    falling = 1.0 - (1.0 - w2) * (rho - 1.0) / clip_high
    w = torch.where(rho <= 1.0, rising, falling)
    w = torch.where((rho < lo) | (rho > hi), torch.zeros_like(w), w)
    if sign_aware:  # only where PPO would clip: above 1 for A>0, below 1 for A<0; 1 elsewhere
        clipped_side = torch.where(adv > 0, rho > 1.0, rho < 1.0)
        w = torch.where(clipped_side, w, torch.ones_like(w))
    return w


def logistic_weight(rho: torch.Tensor, adv: torch.Tensor, alpha: float, gamma: float, eta: float,
                    rescale: bool = False) -> torch.Tensor:
    """Smooth weight sigma(-alpha |log rho|) * sigma(gamma A) + eta. [B, T]"""
    w = torch.sigmoid(-alpha * rho.log().abs()) * torch.sigmoid(gamma * adv)
    return (4.0 * w if rescale else w) + eta


def entropy_boost(old_logprobs: torch.Tensor, adv: torch.Tensor, lam: float) -> torch.Tensor:
    """Multiplier 1 + lam * 1[A>0] * (1 - pi_old(y_t)). [B, T]"""
    rarity = 1.0 - torch.exp(old_logprobs)
    return 1.0 + lam * (adv > 0).to(old_logprobs.dtype) * rarity


def trw_loss(inp: LossInput, weight: torch.Tensor, *, name: str, kl_coef: float, agg_mode: str,
             norm_len: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """-agg(sg(w) * rho * A) [+ kl_coef * agg(k3)], with the weight already computed from detached inputs."""
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    adv = require(inp, "advantages", name)
    rho = torch.exp(log_ratio(inp, name))  # [B, T]
    loss = agg(is_weighted(-(weight.detach() * rho * adv), inp), mask, agg_mode, counts, norm_len)
    metrics = {"pg_loss": float(loss.detach()), "weight_mean": masked_mean(weight, mask, counts),
               "weight_zero_frac": masked_mean((weight == 0).to(mask.dtype), mask, counts),
               "ratio_mean": masked_mean(rho.detach(), mask, counts)}
    if kl_coef:
        ref = require(inp, "ref_logprobs", name, f"kl_coef={kl_coef} > 0; or set kl_coef=0")
        kl = agg(kl_estimate(inp.logprobs, ref, "k3"), mask, agg_mode, counts, norm_len)
        loss = loss + kl_coef * kl
        metrics["kl"] = float(kl.detach())
    return loss, metrics


def _rho_adv(inp: LossInput, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return torch.exp(log_ratio(inp, name)), require(inp, "advantages", name)


def trw_triangular(inp: LossInput, *, clip_low: float, clip_high: float, w0: float, w2: float, sign_aware: bool,
                   **common) -> tuple[torch.Tensor, dict[str, float]]:
    """TRW-GRPO with the triangular weight."""
    rho, adv = _rho_adv(inp, "trw_triangular")
    w = triangular_weight(rho, adv, clip_low, clip_high, w0, w2, sign_aware)
    return trw_loss(inp, w, name="trw_triangular", **common)


def trw_logistic(inp: LossInput, *, alpha: float, gamma: float, eta: float, rescale: bool,
                 **common) -> tuple[torch.Tensor, dict[str, float]]:
    """TRW-GRPO with the smooth logistic weight."""
    rho, adv = _rho_adv(inp, "trw_logistic")
    return trw_loss(inp, logistic_weight(rho, adv, alpha, gamma, eta, rescale), name="trw_logistic", **common)


def trw_entropy(inp: LossInput, *, clip_low: float, clip_high: float, w0: float, w2: float, sign_aware: bool,
                lam: float, **common) -> tuple[torch.Tensor, dict[str, float]]:
    """TRW-GRPO with the triangular weight boosted on rare positive-advantage tokens."""
    rho, adv = _rho_adv(inp, "trw_entropy")
    old = require(inp, "old_logprobs", "trw_entropy")
    w = triangular_weight(rho, adv, clip_low, clip_high, w0, w2, sign_aware) * entropy_boost(old, adv, lam)
    return trw_loss(inp, w, name="trw_entropy", **common)


def trw_indicator(inp: LossInput, *, clip_low: float, clip_high: float, clip_c: float,
                  **common) -> tuple[torch.Tensor, dict[str, float]]:
    """TRW-GRPO with PPO's own 0/1 weight: gradient-identical to dual-clip PPO (the reference point)."""
    rho, adv = _rho_adv(inp, "trw_indicator")
    return trw_loss(inp, grpo_indicator_weight(rho, adv, clip_low, clip_high, clip_c), name="trw_indicator",
                    **common)


TRW_COMMON = dict(kl_coef=0.0, agg_mode="token-mean", norm_len=None)
TRIANGLE = dict(clip_low=0.2, clip_high=0.28, w0=0.5, w2=0.5, sign_aware=False)
