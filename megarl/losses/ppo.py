"""Clipped policy-gradient losses: GRPO, Dr. GRPO, DAPO and REINFORCE++ (docs/algorithms.md).

They differ only in hyperparameters and in the advantage estimator run upstream (``megarl.advantages``):

    rho  = exp(clamp(logp - logp_old, -20, 20))
    l    = max(-A*rho, -A*clamp(rho, 1-eps_low, 1+eps_high))
    l    = min(l, -A*c)            where A < 0                       (dual clip, Ye et al. 2020)
    loss = agg(l) + kl_coef * agg(KL_est(logp, logp_ref)) - entropy_coef * agg(H)

- GRPO     (arXiv 2402.03300): eps 0.2/0.2, c=3 (verl default), k3 KL 1e-3 to a fixed reference.
- Dr. GRPO (arXiv 2503.20783): as GRPO, aggregation "seq-mean-token-sum-norm" (no 1/|o_i| length bias); its
  advantage drops the std normalisation.
- DAPO     (arXiv 2503.14476): clip-higher 0.2/0.28, c=10, no KL, token-mean.
- REINFORCE++ (arXiv 2501.03262), as run in RPG: DAPO's clip, k1 KL 1e-4 **in the loss** against ref_logprobs
  (the RPG scripts pass the old policy as the reference).
"""

from __future__ import annotations

import torch

from megarl.losses.base import (LossInput, agg, counts_of, is_weighted, local_counts, masked_mean, require,
                                token_mask)
from megarl.losses.kl import kl_estimate


def log_ratio(inp: LossInput, loss: str) -> torch.Tensor:
    """log(pi_theta / pi_old) per token, clamped to [-20, 20] so exp() cannot overflow. [B, T]"""
    old = require(inp, "old_logprobs", loss)
    return (inp.logprobs - old).clamp(-20.0, 20.0)


def dual_clip_pg(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float,
                 clip_c: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token dual-clip PPO loss. Returns (loss [B,T], clipped [B,T] bool, dual-clipped [B,T] bool).

    Its gradient is exactly ``-A * rho * grad(log pi) * 1[unclipped]``, where a token is unclipped iff
    ``rho < 1+eps_high`` for A > 0, and ``1-eps_low < rho < c`` for A < 0.
    """
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)  # [B, T]
    was_clipped = clipped > unclipped
    if clip_c is None:
        return loss, was_clipped, torch.zeros_like(was_clipped)
    if clip_c <= 1.0:
        raise ValueError(f"clip_c={clip_c} must be > 1 (the dual-clip bound on rho for negative advantages); "
                         f"set clip_c>1 or clip_c=None to disable dual clip.")
    bound = -adv * clip_c
    dual = (adv < 0) & (loss > bound)
    loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    return loss, was_clipped, dual


def clipped_pg_loss(inp: LossInput, *, name: str, clip_low: float, clip_high: float, clip_c: float | None,
                    kl_coef: float, kl_estimator: str, entropy_coef: float, agg_mode: str,
                    norm_len: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The shared body of GRPO / Dr. GRPO / DAPO / REINFORCE++ (module docstring)."""
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    adv = require(inp, "advantages", name)
    lr = log_ratio(inp, name)
    ratio = torch.exp(lr)  # [B, T]
    pg_mat, clipped, dual = dual_clip_pg(ratio, adv, clip_low, clip_high, clip_c)
    pg = agg(is_weighted(pg_mat, inp), mask, agg_mode, counts, norm_len)
    loss = pg
    metrics = {
        "pg_loss": float(pg.detach()),
        "clip_frac": masked_mean(clipped.to(mask.dtype), mask, counts),
        "clip_frac_dual": masked_mean(dual.to(mask.dtype), mask, counts),
        "ppo_kl": masked_mean(-lr, mask, counts),
        "ratio_mean": masked_mean(ratio.detach(), mask, counts),
    }
    if kl_coef:
        ref = require(inp, "ref_logprobs", name, f"kl_coef={kl_coef} > 0; or set kl_coef=0")
        kl = agg(kl_estimate(inp.logprobs, ref, kl_estimator), mask, agg_mode, counts, norm_len)
        loss = loss + kl_coef * kl
        metrics["kl"] = float(kl.detach())
    if entropy_coef:
        ent = agg(require(inp, "entropy", name, f"entropy_coef={entropy_coef} != 0"), mask, agg_mode, counts,
                  norm_len)
        loss = loss - entropy_coef * ent
        metrics["entropy"] = float(ent.detach())
    return loss, metrics


def grpo(inp: LossInput, **hp) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO, verl's form. See the module docstring; advantages from ``compute_advantages('grpo', ...)``."""
    return clipped_pg_loss(inp, name="grpo", **hp)


def dr_grpo(inp: LossInput, **hp) -> tuple[torch.Tensor, dict[str, float]]:
    """Dr. GRPO: GRPO with "seq-mean-token-sum-norm" and ``compute_advantages('dr_grpo', ...)`` (no std)."""
    return clipped_pg_loss(inp, name="dr_grpo", **hp)


def dapo(inp: LossInput, **hp) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO: clip-higher, dual clip c=10, no KL, token-mean. Dynamic sampling lives in ``megarl.rollout``."""
    return clipped_pg_loss(inp, name="dapo", **hp)


def reinforce_pp(inp: LossInput, **hp) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE++: dual-clip PPO on batch-whitened returns plus k1 KL 1e-4 in the loss."""
    return clipped_pg_loss(inp, name="reinforce_pp", **hp)


PPO_DEFAULTS = dict(clip_low=0.2, clip_high=0.2, clip_c=3.0, kl_coef=1e-3, kl_estimator="k3", entropy_coef=0.0,
                    agg_mode="token-mean", norm_len=None)
