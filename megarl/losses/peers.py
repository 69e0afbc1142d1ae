"""Policy losses the peer frameworks ship: GSPO, GMPO (sequence-level ratios), CISPO, SAPO (soft or detached
clipping). Each reads group advantages A and the old policy; lr_t = log pi_theta - log pi_old per token.

GSPO (arXiv 2507.18071), the token-level gradient form ("GSPO-token" with A constant per response):
    s_i     = exp(mean_t lr_t)                                      the sequence ratio
    s_i,t   = sg(s_i) * pi_theta(y_t) / sg(pi_theta(y_t))           value s_i, gradient s_i * grad log pi(y_t)
    L       = seq-mean-token-mean( max(-A s_i,t, -A clip(s_i,t, 1 - 3e-4, 1 + 4e-4)) )
  Its gradient is the sequence objective's: -A s_i * mean_t grad log pi(y_t) on unclipped responses. As verl, the
  log of s_i,t is capped at 10 before exp.

GMPO (arXiv 2507.20673): the geometric mean of token ratios, each clipped in log space (e^-0.4, e^0.4):
    lr'_t   = sgn(A) * min(sgn(A) lr_t, sgn(A) clamp(lr_t, -eps_low, eps_high))
    L       = 1/N_seqs * sum_i -A_i * exp(mean_t lr'_t)

CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, not the update; no token is dropped:
    L       = token-mean( -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) * A * log pi_theta(y_t) )
  The paper sets no lower bound (eps_low = 1 here: the weight may go to 0) and does not publish its eps_high;
  0.28 (DAPO's clip-higher) is our default.

SAPO (arXiv 2511.20347): a smooth gate of the ratio instead of the hard clip, temperature by the sign of A:
    f(rho)  = 4/tau * sigmoid(tau (rho - 1)),   tau = tau_pos (1.0) if A > 0 else tau_neg (1.05)
    L       = seq-mean-token-mean( -f(rho_t) * A )
  d L / d log pi = -A * 4 sigma (1 - sigma) * rho: exactly PPO's -A at rho = 1, fading smoothly away from it.

Each adds ``kl_coef * agg(KL_est(logp, logp_ref))`` when kl_coef > 0 (default 0: none of the papers regularises
toward a reference). Rollout-correction IS weights multiply the per-token policy-gradient term (GMPO's per-
response term takes sequence weights only).
"""

from __future__ import annotations

import torch

from megarl.losses.base import (LossInput, agg, counts_of, is_weighted, local_counts, masked_mean, require, seq_mean,
                                token_mask)
from megarl.losses.kl import kl_estimate
from megarl.losses.ppo import log_ratio


def _with_kl(inp: LossInput, loss: torch.Tensor, metrics: dict, name: str, kl_coef: float, kl_estimator: str,
             agg_mode: str, counts) -> tuple[torch.Tensor, dict[str, float]]:
    metrics["pg_loss"] = float(loss.detach())
    if kl_coef:
        ref = require(inp, "ref_logprobs", name, f"kl_coef={kl_coef} > 0; or set kl_coef=0")
        kl = agg(kl_estimate(inp.logprobs, ref, kl_estimator), token_mask(inp), agg_mode, counts)
        loss = loss + kl_coef * kl
        metrics["kl"] = float(kl.detach())
    return loss, metrics


def gspo(inp: LossInput, *, clip_low: float, clip_high: float, kl_coef: float,
         kl_estimator: str) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO, token-level gradient form (module docstring)."""
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    adv = require(inp, "advantages", "gspo")
    lr = log_ratio(inp, "gspo")
    seq = ((lr * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).detach()  # [B] log s_i
    ratio = torch.exp((inp.logprobs - inp.logprobs.detach() + seq[:, None]).clamp(max=10.0))  # value s_i
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = agg(is_weighted(torch.maximum(unclipped, clipped), inp), mask, "seq-mean-token-mean", counts)
    metrics = {"clip_frac": masked_mean((clipped > unclipped).to(mask.dtype), mask, counts),
               "seq_ratio_mean": seq_mean(torch.exp(seq), mask, counts)}
    return _with_kl(inp, pg, metrics, "gspo", kl_coef, kl_estimator, "seq-mean-token-mean", counts)


def gmpo(inp: LossInput, *, clip_low: float, clip_high: float, kl_coef: float,
         kl_estimator: str) -> tuple[torch.Tensor, dict[str, float]]:
    """GMPO: geometric-mean ratio with token-wise clipping in log space (module docstring)."""
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    adv_tok = require(inp, "advantages", "gmpo")
    n = mask.sum(-1).clamp(min=1.0)
    adv = (adv_tok * mask).sum(-1) / n  # [B] the response's advantage
    lr = log_ratio(inp, "gmpo")
    sign = torch.sign(adv)[:, None]
    clamped = lr.clamp(-clip_low, clip_high)
    lr_min = sign * torch.minimum(sign * lr, sign * clamped)
    ratio = torch.exp((lr_min * mask).sum(-1) / n)  # [B]
    per_seq = -adv * ratio * (mask.sum(-1) > 0)
    if inp.is_weights is not None:  # rollout_is=sequence: one weight per response
        per_seq = per_seq * inp.is_weights.max(-1).values.to(per_seq.dtype)
    pg = per_seq.sum() / max(counts["seqs"], 1.0)
    metrics = {"clip_frac": masked_mean((lr != clamped).to(mask.dtype), mask, counts),
               "geo_ratio_mean": seq_mean(ratio, mask, counts)}
    return _with_kl(inp, pg, metrics, "gmpo", kl_coef, kl_estimator, "seq-mean-token-mean", counts)


def cispo(inp: LossInput, *, clip_low: float, clip_high: float, kl_coef: float,
          kl_estimator: str) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO: detached clipped IS weight times A times log pi (module docstring)."""
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    adv = require(inp, "advantages", "cispo")
    ratio = torch.exp(log_ratio(inp, "cispo")).detach()
    weight = ratio.clamp(max(1.0 - clip_low, 0.0), 1.0 + clip_high)
    pg = agg(is_weighted(-weight * adv * inp.logprobs, inp), mask, "token-mean", counts)
    metrics = {"clip_frac": masked_mean((weight != ratio).to(mask.dtype), mask, counts),
               "ratio_mean": masked_mean(ratio, mask, counts)}
    return _with_kl(inp, pg, metrics, "cispo", kl_coef, kl_estimator, "token-mean", counts)


def sapo(inp: LossInput, *, tau_pos: float, tau_neg: float, kl_coef: float,
         kl_estimator: str) -> tuple[torch.Tensor, dict[str, float]]:
    """SAPO: soft sigmoid gate of the ratio (module docstring)."""
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"sapo: tau_pos={tau_pos} and tau_neg={tau_neg} must both be > 0.")
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    adv = require(inp, "advantages", "sapo")
    ratio = torch.exp(log_ratio(inp, "sapo"))
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    pg = agg(is_weighted(-gate * adv, inp), mask, "seq-mean-token-mean", counts)
    metrics = {"ratio_mean": masked_mean(ratio.detach(), mask, counts), "gate_mean": masked_mean(gate.detach(), mask, counts)}
    return _with_kl(inp, pg, metrics, "sapo", kl_coef, kl_estimator, "seq-mean-token-mean", counts)


NO_KL = dict(kl_coef=0.0, kl_estimator="k3")
GSPO_DEFAULTS = dict(clip_low=3e-4, clip_high=4e-4, **NO_KL)
GMPO_DEFAULTS = dict(clip_low=0.4, clip_high=0.4, **NO_KL)
CISPO_DEFAULTS = dict(clip_low=1.0, clip_high=0.28, **NO_KL)
SAPO_DEFAULTS = dict(tau_pos=1.0, tau_neg=1.05, **NO_KL)
