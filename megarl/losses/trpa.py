"""TRPA: Trust Region Preference Approximation (arXiv 2504.04524; docs/algorithms.md).

Rule rewards give each response a preference level (1 best). Within each prompt group every response i at a
better level is paired with every response j at a worse level (all cross-level pairs, not only adjacent):

    l_i     = mean_t (log pi_theta - log pi_ref)(y_i)                    length-normalised, vs the FIXED reference
    L_pref  = -1/D * [ sum_{(i>j)} log sigma(beta_ij (l_i - l_j))  +  sum_{i in pairless groups} log sigma(s_i l_i) ]
    beta_ij = beta * kappa if level_i == 1 else beta,   s_i = +1 if level_i == 1 else -1
    L_TR    = token-mean k3(logp, logp_old)                              KL(pi_theta || pi_old) trust region
    L       = L_pref + tr_coef * L_TR

D = number of pairs + number of fallback samples, counted over the whole mini-batch.

Departures from upstream (XueruiSu/Trust-Region-Preference-Approximation@f372585), both DERIVED:
- upstream forms pairs per micro-batch per rank, so groups get split; here pairs span the whole group, and the
  caller must keep each group inside one micro-batch (a group seen with one sample raises).
- upstream uses the unpaired fallback only when the whole micro-batch has no pair; here it applies per group
  (a group whose responses all share one level), with one shared denominator. When no group has a pair, or every
  group has one, this is exactly the upstream value.
The KL to the reference is logged, not optimised (upstream ``use_trkl_loss=True``); there is no entropy term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megarl.losses.base import LossInput, agg, counts_of, local_counts, require, seq_mean, token_mask
from megarl.losses.kl import kl_estimate


def seq_mean_logratio(inp: LossInput, mask: torch.Tensor) -> torch.Tensor:
    """l_i = mean over valid tokens of log pi_theta - log pi_ref. [B]"""
    ref = require(inp, "ref_logprobs", "trpa", "l_i is the log-ratio to the fixed reference")
    return ((inp.logprobs - ref) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _groups(inp: LossInput) -> list[torch.Tensor]:
    """Indices of each group's responses that have valid tokens (rollout-correction rejection can empty a row,
    which then leaves the pairs); raises on a group with a single response."""
    gid = require(inp, "group_ids", "trpa")
    out = []
    for g in torch.unique(gid):
        idx = (gid == g).nonzero().squeeze(-1)
        if idx.numel() < 2:
            raise ValueError(f"trpa: group {int(g)} has a single response in this batch. TRPA pairs need whole "
                             f"groups of >= 2 responses: set rollout.group_size >= 2 and keep groups whole when "
                             f"splitting into micro-batches.")
        idx = idx[inp.mask[idx].sum(-1) > 0]
        if idx.numel():
            out.append(idx)
    return out


def pair_terms(inp: LossInput, ell: torch.Tensor, beta: float, kappa: float) -> tuple[torch.Tensor, int, int]:
    """All pair and fallback arguments of log-sigmoid, concatenated. Returns (args [K], n_pairs, n_fallback)."""
    levels = require(inp, "levels", "trpa", "preference levels from the rule reward")
    args, n_pairs, n_fallback = [ell.new_zeros(0)], 0, 0
    for idx in _groups(inp):
        lv, el = levels[idx], ell[idx]
        better = lv[:, None] < lv[None, :]  # [g, g] i preferred over j
        if better.any():
            coef = torch.where(lv == 1, beta * kappa, beta).to(el.dtype)[:, None].expand_as(better)
            args.append((coef * (el[:, None] - el[None, :]))[better])
            n_pairs += int(better.sum())
        else:  # no cross-level pair: unpaired push up (level 1) or down (otherwise), no beta (upstream quirk)
            sign = torch.where(lv == 1, 1.0, -1.0).to(el.dtype)
            args.append(sign * el)
            n_fallback += idx.numel()
    return torch.cat(args), n_pairs, n_fallback


def trpa_counts(inp: LossInput) -> dict[str, float]:
    """Additive normalisers: tokens, seqs, and the pair + fallback terms of the preference loss."""
    mask = token_mask(inp)
    zero = torch.zeros(inp.logprobs.shape[0], dtype=inp.logprobs.dtype)
    _, n_pairs, n_fallback = pair_terms(inp, zero, 1.0, 1.0)
    return {**local_counts(mask), "pref_terms": float(n_pairs + n_fallback)}


def trpa(inp: LossInput, *, beta: float, kappa: float, tr_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """TRPA loss (module docstring)."""
    mask = token_mask(inp)
    ell = seq_mean_logratio(inp, mask)  # [B]
    args, n_pairs, n_fallback = pair_terms(inp, ell, beta, kappa)
    counts = counts_of(inp, {**local_counts(mask), "pref_terms": float(n_pairs + n_fallback)})
    l_pref = -F.logsigmoid(args).sum() / max(counts["pref_terms"], 1.0)
    old = require(inp, "old_logprobs", "trpa", "the trust region is KL(pi_theta || pi_old)")
    l_tr = agg(kl_estimate(inp.logprobs, old, "k3"), mask, "token-mean", counts)
    loss = l_pref + tr_coef * l_tr
    with torch.no_grad():
        ref_kl = agg(kl_estimate(inp.logprobs, inp.ref_logprobs, "k3"), mask, "token-mean", counts)
    metrics = {"pref_loss": float(l_pref.detach()), "tr_kl": float(l_tr.detach()), "kl_ref": float(ref_kl.detach()),
               "pairs": float(n_pairs), "fallback_samples": float(n_fallback),
               "logratio_mean": seq_mean(ell, mask, counts)}
    return loss, metrics


TRPA_DEFAULTS = dict(beta=0.1, kappa=2.5, tr_coef=1e-3)
