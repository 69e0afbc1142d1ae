"""A*-PO: policy optimisation via optimal advantage regression (arXiv 2505.20686; docs/algorithms.md).

Stage 1 (offline, ``megarl.advantages.estimate_v_star``) estimates V*(x) from N reference samples per prompt.
Stage 2 samples ONE response per prompt and regresses the scaled log-ratio onto the optimal advantage:

    s_i  = sum_t (log pi_theta - log pi_ref)(y_i)              token SUM, against the frozen initial model
    L    = 1/N_seqs * sum_i ( beta2 * s_i - (r_i - V*(x_i)) )^2  -  entropy_coef * token-mean(H)

No old policy, no ratio, no clipping (upstream ZhaolinGao/A-PO@c8823a3, verl/trainer/apo/core_algos.py).
"""

from __future__ import annotations

import torch

from megarl.losses.base import LossInput, agg, counts_of, local_counts, require, seq_mean, token_mask


def astar_po(inp: LossInput, *, beta2: float, entropy_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """A*-PO least-squares loss (module docstring)."""
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    ref = require(inp, "ref_logprobs", "astar_po", "s_i is the summed log-ratio to the reference")
    target = require(inp, "rewards", "astar_po") - require(inp, "v_star", "astar_po")  # [B] optimal advantage
    s = ((inp.logprobs - ref) * mask).sum(-1)  # [B]
    residual = beta2 * s - target.to(s.dtype)
    sq = residual.square() * (mask.sum(-1) > 0)  # a row emptied by rollout-correction rejection leaves the loss
    if inp.is_weights is not None:  # rollout_is=sequence: one weight per response (registry: no token mode)
        sq = sq * inp.is_weights.max(-1).values.to(sq.dtype)
    reg = sq.sum() / max(counts["seqs"], 1.0)
    loss = reg
    metrics = {"regression_loss": float(reg.detach()), "logratio_sum_mean": seq_mean(s, mask, counts),
               "target_adv_mean": seq_mean(target, mask, counts)}
    if entropy_coef:
        ent = agg(require(inp, "entropy", "astar_po", f"entropy_coef={entropy_coef} != 0"), mask, "token-mean",
                  counts)
        loss = loss - entropy_coef * ent
        metrics["entropy"] = float(ent.detach())
    return loss, metrics


ASTAR_PO_DEFAULTS = dict(beta2=1e-3, entropy_coef=1e-3)
