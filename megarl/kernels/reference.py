"""The plain-torch oracle: log p(target) and entropy from vocab-parallel logits, by autograd.

For one token with logits z (this rank holds columns [v0, v0 + V_r)), after dividing by the temperature:

    m   = max_v z_v                (TP max, a shift only)      S = sum_v exp(z_v - m)     (TP sum)
    lse = m + log S                logp = z_target - lse        H = lse - sum_v p_v z_v    (TP sums)

Columns at or past ``vocab_size`` (vocabulary padding for even sharding) are excluded. Materialises fp32 [T, V_r]:
this is the memory-hungry path the fused kernels replace, and the reference they are tested against.
"""

from __future__ import annotations

import torch

from megarl.kernels.tp import acc_dtype, all_reduce_max, all_reduce_sum, tp_rank


def shard_columns(width: int, group, device) -> torch.Tensor:
    """Global vocabulary ids of this rank's columns."""
    start = tp_rank(group) * width
    return torch.arange(start, start + width, device=device)


def logprob_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                              vocab_size: int | None = None, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, V_r] (any float dtype), targets [T] global ids -> (logp [T], entropy [T]) in fp32 (fp64 for fp64 input)."""
    z = logits.to(acc_dtype(logits.dtype)) / temperature
    cols = shard_columns(z.shape[-1], group, z.device)
    valid = cols < vocab_size if vocab_size is not None else torch.ones_like(cols, dtype=torch.bool)
    z = z.masked_fill(~valid, float("-inf"))
    m = all_reduce_max(z.max(dim=-1).values, group)  # [T]
    e = torch.exp(z - m[:, None])  # [T, V_r], 0 on padded columns
    s = all_reduce_sum(e.sum(-1), group)
    lse = m + torch.log(s)
    hit = cols[None, :] == targets[:, None]  # [T, V_r]
    z_target = all_reduce_sum(torch.where(hit, z, torch.zeros_like(z)).sum(-1), group)
    # e * z with z zeroed (not -inf) on padded columns: 0 * -inf would poison the backward with NaN
    ez = all_reduce_sum((e * z.masked_fill(~valid, 0.0)).sum(-1), group) / s
    return z_target - lse, lse - ez
