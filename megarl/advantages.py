"""Advantage estimators and A*-PO's optimal value V*. Pure torch.

Outcome rewards r [B] (one per response), group ids g [B] (one per prompt), response mask m [B, T] -> A [B, T].

    grpo                   A_i = (r_i - mean_g r) / (std_g r + eps)     std unbiased (N-1); a group of 1: mean 0, std 1
    dr_grpo, rpg           A_i = r_i - mean_g r                          (a group of 1: mean 0)
    rloo                   A_i = r_i - mean_{j in g, j != i} r_j         (a group of 1: A_i = r_i)
    reinforce_pp           A = whiten(r broadcast to tokens) over ALL valid tokens of the batch, times m
    reinforce_pp_baseline  A = whiten((r_i - mean_g r) broadcast) over all valid tokens, times m

whiten(x) = (x - mean) / sqrt(var + 1e-8) with the token-weighted mean and the unbiased token variance
(verl ``masked_whiten``). Batch-level estimators must see the whole batch: compute advantages before any split.
"""

from __future__ import annotations

import math

import torch

ADVANTAGES = ("grpo", "dr_grpo", "rpg", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_RELATIVE = frozenset(ADVANTAGES) - {"reinforce_pp"}  # compare a response with its group: need >= 2 per prompt


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse [B] mapping each response to its group slot, size [G] of each group)."""
    _, inverse, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, sizes


def group_mean(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean reward of each response's group, 0 for a group of one (verl's convention). [B]"""
    inverse, sizes = _group_index(group_ids)
    sums = torch.zeros(len(sizes), dtype=rewards.dtype).index_add_(0, inverse, rewards)
    mean = sums / sizes.to(rewards.dtype)
    return torch.where(sizes[inverse] > 1, mean[inverse], torch.zeros_like(rewards))


def group_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Unbiased std of each response's group, 1 for a group of one. [B]"""
    inverse, sizes = _group_index(group_ids)
    mean = group_mean(rewards, group_ids)
    sq = torch.zeros(len(sizes), dtype=rewards.dtype).index_add_(0, inverse, (rewards - mean).square())
    n = sizes[inverse].to(rewards.dtype)
    return torch.where(n > 1, (sq[inverse] / (n - 1).clamp(min=1)).sqrt(), torch.ones_like(rewards))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over valid tokens; unbiased variance. [B, T]"""
    n = mask.sum()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens in the batch, got {int(n)}.")
    mean = (x * mask).sum() / n
    var = ((x - mean).square() * mask).sum() / n * (n / (n - 1))
    return (x - mean) * torch.rsqrt(var + eps)


def compute_advantages(name: str, *, rewards: torch.Tensor, group_ids: torch.Tensor | None = None,
                       mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Token-level advantages [B, T] for estimator ``name`` (module docstring)."""
    if rewards.dim() != 1 or mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"compute_advantages wants rewards [B] and mask [B, T]; got {tuple(rewards.shape)} and "
                         f"{tuple(mask.shape)}.")
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    m = mask.to(r.dtype)
    if name == "reinforce_pp":
        return masked_whiten(r[:, None] * m, m) * m
    if group_ids is None:
        raise ValueError(f"advantage '{name}' is group-relative and needs group_ids [B].")
    if name == "grpo":
        per_seq = (r - group_mean(r, group_ids)) / (group_std(r, group_ids) + eps)
    elif name in ("dr_grpo", "rpg"):
        per_seq = r - group_mean(r, group_ids)
    elif name == "rloo":
        inverse, sizes = _group_index(group_ids)
        n = sizes[inverse].to(r.dtype)
        sums = torch.zeros(len(sizes), dtype=r.dtype).index_add_(0, inverse, r)[inverse]
        per_seq = torch.where(n > 1, r - (sums - r) / (n - 1).clamp(min=1), r)
    elif name == "reinforce_pp_baseline":
        return masked_whiten((r - group_mean(r, group_ids))[:, None] * m, m) * m
    else:
        import difflib
        close = difflib.get_close_matches(name, ADVANTAGES, n=1)
        raise ValueError(f"Unknown advantage estimator '{name}'. Known: {', '.join(ADVANTAGES)}."
                         + (f" Did you mean '{close[0]}'?" if close else ""))
    return per_seq[:, None] * m


def estimate_v_star(rewards_per_prompt: torch.Tensor, beta1: float = 0.5) -> torch.Tensor:
    """A*-PO's V*(x) = beta1 * log( 1/N sum_i exp(r_i / beta1) ) from N reference samples. [P, N] -> [P]

    beta1 == 0 gives the plain mean (the beta1 -> 0+ limit is the max; upstream uses the mean), beta1 < 0 gives
    zeros (upstream's "no V*" switch). For r = (0, 1), beta1 = 0.5: 0.5 * log((1 + e^2) / 2).
    """
    r = rewards_per_prompt.to(torch.float64)
    if r.dim() != 2 or r.shape[1] < 1:
        raise ValueError(f"estimate_v_star wants rewards [prompts, samples]; got {tuple(r.shape)}.")
    if beta1 > 0:
        return beta1 * (torch.logsumexp(r / beta1, dim=1) - math.log(r.shape[1]))
    if beta1 == 0:
        return r.mean(dim=1)
    return torch.zeros(r.shape[0], dtype=torch.float64)
