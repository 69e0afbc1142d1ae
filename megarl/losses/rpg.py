"""RPG: regularized policy gradients (arXiv 2505.17508; complex-reasoning/RPG@ec8e30b; docs/algorithms.md).

The reference is the OLD policy (every RPG run sets use_iterative_ref_model=True), so w = pi_theta / pi_old and
every KL term below uses ``old_logprobs``.

Fully differentiable (paper Table 1, as run): the -w*R term is the dual-clip PPO loss on A, Z_old is dropped:

    L = dual_clip_pg(w, A) + beta * token-mean(kl(w)),   lw = log w
    fkl: -lw      rkl: w*lw      ufkl: w - lw - 1      urkl: w*(lw - 1) + 1      (all but fkl clamped to [-10, 10])

REINFORCE-style (paper Table 2), w_c = clamp(sg(w), 1-eps_l, 1+eps_h):

    L = -token-mean( sg(A*w_c + k(w_c)) * log pi_theta )
    k:  fkl: beta     rkl: -beta*w_c*(log w_c + 1)     ufkl: beta*(1 - w_c)     urkl: -beta*w_c*log w_c

RPG-style clip: coefficient sg(A*w + k(w_c)) (note: UNclamped w on A) times the dual-clip keep-mask
``A>0: w < 1+eps_h;  A<=0: 1-eps_l <= w < c``. With beta=0 it is gradient-identical to dual-clip PPO.

Departure: upstream imports ``compute_policy_loss_reinforce`` but never calls it; this is
the paper's loss, written from its Table 2 and that unused function.
"""

from __future__ import annotations

import torch

from megarl.losses.base import (LossInput, agg, counts_of, is_weighted, local_counts, masked_mean, require,
                                token_mask)
from megarl.losses.ppo import dual_clip_pg, log_ratio

DIVERGENCES = ("fkl", "rkl", "ufkl", "urkl")


def rpg_kl_matrix(lw: torch.Tensor, div: str) -> torch.Tensor:
    """Table 1's differentiable divergence term per token, lw = log(pi_theta / pi_old). [B, T]"""
    w = torch.exp(lw)
    if div == "fkl":
        return -lw
    if div == "rkl":
        return (w * lw).clamp(-10.0, 10.0)
    if div == "ufkl":
        return (w - lw - 1.0).clamp(-10.0, 10.0)
    if div == "urkl":
        return (w * (lw - 1.0) + 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"Unknown RPG divergence '{div}'. Known: {', '.join(DIVERGENCES)}.")


def rpg_reinforce_kl_term(wc: torch.Tensor, div: str, beta: float) -> torch.Tensor:
    """Table 2's regulariser inside the stop-gradient coefficient. [B, T]"""
    if div == "fkl":
        return torch.full_like(wc, beta)
    if div == "rkl":
        return -beta * wc * (wc.log() + 1.0)
    if div == "ufkl":
        return beta * (1.0 - wc)
    if div == "urkl":
        return -beta * wc * wc.log()
    raise ValueError(f"Unknown RPG divergence '{div}'. Known: {', '.join(DIVERGENCES)}.")


def rpg_differentiable(inp: LossInput, *, div: str, clip_low: float, clip_high: float, clip_c: float,
                       beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Fully differentiable RPG (module docstring)."""
    name = f"rpg_{div}"
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    lw = log_ratio(inp, name)
    pg_mat, clipped, dual = dual_clip_pg(torch.exp(lw), require(inp, "advantages", name), clip_low, clip_high,
                                         clip_c)
    pg = agg(is_weighted(pg_mat, inp), mask, "token-mean", counts)
    # fkl (-lw) from the UNclamped log-ratio, as the paper's runs: its gradient is -1 even where |lw| > 20. The
    # others exponentiate lw, so they keep the [-20, 20] clamp against overflow; past it their values are already
    # at the [-10, 10] clamp or within exp(-20) of the unclamped ones
    raw = inp.logprobs - inp.old_logprobs
    kl = agg(rpg_kl_matrix(raw if div == "fkl" else lw, div), mask, "token-mean", counts)
    metrics = {"pg_loss": float(pg.detach()), "kl": float(kl.detach()),
               "clip_frac": masked_mean(clipped.to(mask.dtype), mask, counts),
               "clip_frac_dual": masked_mean(dual.to(mask.dtype), mask, counts)}
    return pg + beta * kl, metrics


def rpg_reinforce(inp: LossInput, *, div: str, clip_low: float, clip_high: float, clip_c: float, beta: float,
                  rpg_style_clip: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """RPG-REINFORCE, with truncated importance weights or the RPG-style clip (module docstring)."""
    name = f"rpg_rf_{div}" + ("_clip" if rpg_style_clip else "")
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    adv = require(inp, "advantages", name)
    with torch.no_grad():
        w = torch.exp(log_ratio(inp, name))  # [B, T]
        wc = w.clamp(1.0 - clip_low, 1.0 + clip_high)
        kl_term = rpg_reinforce_kl_term(wc, div, beta)
        if rpg_style_clip:
            keep = torch.where(adv > 0, w < 1.0 + clip_high, (w >= 1.0 - clip_low) & (w < clip_c))
            coef = (adv * w + kl_term) * keep.to(w.dtype)
        else:
            keep = torch.ones_like(w, dtype=torch.bool)
            coef = adv * wc + kl_term
    loss = agg(is_weighted(-coef * inp.logprobs, inp), mask, "token-mean", counts)
    metrics = {"pg_loss": float(loss.detach()), "coef_mean": masked_mean(coef, mask, counts),
               "clip_frac": masked_mean((~keep).to(mask.dtype), mask, counts) if rpg_style_clip
               else masked_mean((w != wc).to(mask.dtype), mask, counts),
               "ratio_mean": masked_mean(w, mask, counts)}
    return loss, metrics


RPG_DEFAULTS = dict(clip_low=0.2, clip_high=0.28, clip_c=10.0, beta=1e-4)
