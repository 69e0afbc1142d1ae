"""Clip-Cov and KL-Cov (arXiv 2505.22617): keep the policy's entropy from collapsing by restraining the few
tokens whose log-probability and advantage covary most (the paper shows they drive the entropy down).

    cov_t   = (A_t - mean A) * (log pi_old(y_t) - mean log pi_old)         over the valid tokens of the step
    n       = max(1, int(select_ratio * N_tokens))

Clip-Cov: n tokens drawn at random among those with cov_lb < cov_t < cov_ub lose their policy-gradient term
          (multiplied by 0 and kept in the normaliser, as verl); the rest is the dual-clip PPO loss, whose clip the
          paper's recipe opens wide (1 - 1 = 0 / 1 + 1 = 2, c = 10).
KL-Cov:   the n tokens of largest cov_t get ``ppo_kl_coef * |log pi_theta - log pi_old|`` added; every token's
          term is the unclipped -A * rho.

Departure (DERIVED, for exact micro-batch and data-parallel invariance): the selection is made once per RL step
over the whole step's tokens on every rank, with pi_old's log-probs (the trainer's ``select_over_dp``), and passed
in as ``LossInput.selected``; verl selects per micro-batch with the current log-probs. They coincide for one
micro-batch and one mini-batch per step, where pi_theta = pi_old at the update. Called without ``selected`` (one
process, whole batch), a loss selects on its own input. Clip-Cov's draw is seeded per step by the trainer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megarl.losses.base import (LossInput, agg, counts_of, is_weighted, local_counts, masked_mean, require,
                                token_mask)
from megarl.losses.ppo import dual_clip_pg, log_ratio


def covariance(old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cov_t of the module docstring on valid tokens; -inf elsewhere. [B, T]"""
    m = mask > 0
    if not m.any():
        return torch.full_like(old_logprobs, -torch.inf)
    a, lp = advantages.detach().double(), old_logprobs.detach().double()
    cov = (a - a[m].mean()) * (lp - lp[m].mean())
    return torch.where(m, cov, torch.full_like(cov, -torch.inf))


def _how_many(mask: torch.Tensor, ratio: float) -> int:
    return max(1, int(ratio * float((mask > 0).sum())))


def clip_cov_select(cov: torch.Tensor, mask: torch.Tensor, hp: Mapping, generator=None) -> torch.Tensor:
    """1 on the tokens whose gradient Clip-Cov drops (module docstring). [B, T]"""
    candidates = ((cov > hp["cov_lb"]) & (cov < hp["cov_ub"]) & (mask > 0)).flatten().nonzero().squeeze(-1)
    n = min(_how_many(mask, hp["select_ratio"]), candidates.numel())
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:n]]
    out = torch.zeros(cov.numel(), dtype=mask.dtype)
    out[chosen] = 1.0
    return out.view_as(mask)


def kl_cov_select(cov: torch.Tensor, mask: torch.Tensor, hp: Mapping, generator=None) -> torch.Tensor:
    """1 on the tokens of largest covariance that KL-Cov penalises (module docstring). [B, T]"""
    if not (mask > 0).any():
        return torch.zeros_like(mask)
    n = _how_many(mask, hp["select_ratio"])
    out = torch.zeros(cov.numel(), dtype=mask.dtype)
    out[torch.topk(cov.flatten(), n).indices] = 1.0
    return out.view_as(mask)


def _selected(inp: LossInput, mask: torch.Tensor, select, hp: Mapping, name: str) -> torch.Tensor:
    if inp.selected is not None:
        return inp.selected.to(mask.dtype)
    cov = covariance(require(inp, "old_logprobs", name), require(inp, "advantages", name), mask)
    return select(cov, mask, hp).to(mask.device)


def clip_cov(inp: LossInput, *, clip_low: float, clip_high: float, clip_c: float, select_ratio: float,
             cov_lb: float, cov_ub: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clip-Cov (module docstring)."""
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    sel = _selected(inp, mask, clip_cov_select, dict(select_ratio=select_ratio, cov_lb=cov_lb, cov_ub=cov_ub),
                    "clip_cov")
    ratio = torch.exp(log_ratio(inp, "clip_cov"))
    pg_mat, clipped, _ = dual_clip_pg(ratio, require(inp, "advantages", "clip_cov"), clip_low, clip_high, clip_c)
    pg = agg(is_weighted(pg_mat * (1.0 - sel), inp), mask, "token-mean", counts)
    return pg, {"pg_loss": float(pg.detach()), "cov_frac": masked_mean(sel, mask, counts),
                "clip_frac": masked_mean(clipped.to(mask.dtype), mask, counts)}


def kl_cov(inp: LossInput, *, select_ratio: float, ppo_kl_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """KL-Cov (module docstring)."""
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    sel = _selected(inp, mask, kl_cov_select, dict(select_ratio=select_ratio), "kl_cov")
    lr = log_ratio(inp, "kl_cov")
    pg_mat = -require(inp, "advantages", "kl_cov") * torch.exp(lr) + sel * ppo_kl_coef * lr.abs()
    pg = agg(is_weighted(pg_mat, inp), mask, "token-mean", counts)
    return pg, {"pg_loss": float(pg.detach()), "cov_frac": masked_mean(sel, mask, counts),
                "abs_kl": masked_mean(lr.abs().detach(), mask, counts)}


CLIP_COV_DEFAULTS = dict(clip_low=1.0, clip_high=1.0, clip_c=10.0, select_ratio=2e-4, cov_lb=1.0, cov_ub=5.0)
KL_COV_DEFAULTS = dict(select_ratio=2e-3, ppo_kl_coef=1.0)
