"""DAPO's rollout-side pieces (arXiv 2503.14476; docs/algorithms.md, "GRPO, Dr. GRPO and DAPO"): dynamic sampling
and overlong shaping."""

from __future__ import annotations

import torch


def dynamic_sampling_keep(metric: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Keep a response iff its group's metric (e.g. ``acc``) varies, or the group has one response. [B] bool

    A group whose responses all score the same has zero group-relative advantage and contributes no gradient;
    DAPO drops it and samples more prompts instead. Spread is tested with the population std, as upstream.
    """
    _, inverse, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    x = metric.to(torch.float64)
    lo = torch.full((len(sizes),), float("inf"), dtype=torch.float64).scatter_reduce(0, inverse, x, "amin")
    hi = torch.full((len(sizes),), float("-inf"), dtype=torch.float64).scatter_reduce(0, inverse, x, "amax")
    return ((hi > lo) | (sizes == 1))[inverse]


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """Soft overlong punishment added to the reward: 0 up to max_len - buffer_len, then linear down to -factor.

        pen = min( -(len - (max_len - buffer_len)) / buffer_len * factor, 0 )                              [B]
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"overlong shaping needs 0 < buffer_len ({buffer_len}) <= max_len ({max_len}).")
    expected = max_len - buffer_len
    pen = -(lengths.to(torch.float64) - expected) / buffer_len * factor
    return pen.clamp(max=0.0)
