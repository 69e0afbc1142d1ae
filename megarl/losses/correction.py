"""Rollout correction: the engine that sampled (vLLM, bf16/FP8, an older policy) is not the trainer's pi_old.

The semantics of verl's rollout correction (verl-project/verl ``docs/algo/rollout_corr.md``; arXiv 2512.23075),
from the per-token log-ratio between the trainer's pi_old and the sampler's log-probs (``LossInput.rollout_logprobs``):

    lr_t = log pi_old(y_t) - log pi_rollout(y_t)

IS weights (``rollout_is``), detached, multiply each loss's per-token policy-gradient term (never its KL terms):

    token      w_t = min(exp(clamp(lr_t, -20, 20)), C)                          C = rollout_is_threshold (2.0)
    sequence   w_t = min(exp(clamp(sum_t lr_t, -20, 20)), C) on every token of the sequence

Rejection (``rollout_rs``): tokens or whole sequences whose ratio lies outside [lower, upper]
(``rollout_rs_threshold_lower`` 0.5, ``rollout_rs_threshold`` 2.0) leave the loss AND its normalisers, so the
micro-batch / data-parallel invariance of megarl/losses/base.py still holds:

    token      rho_t = exp(lr_t)                      sequence   exp(sum_t lr_t)      geometric   exp(mean_t lr_t)

Both depend only on pi_old and pi_rollout, fixed before the update, so ``counts()`` sees the same rejections as
the loss. With ``algo.bypass_old_logprobs`` pi_old *is* pi_rollout: lr = 0, and the PPO ratio itself compares
pi_theta with pi_rollout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from megarl.losses.base import require

CORRECTION_DEFAULTS = dict(rollout_is="none", rollout_is_threshold=2.0, rollout_rs="none", rollout_rs_threshold=2.0,
                           rollout_rs_threshold_lower=0.5)
IS_MODES = ("none", "token", "sequence")
RS_MODES = ("none", "token", "sequence", "geometric")
SAFETY = 20.0


def check(hp: Mapping, loss: str, allowed_is: tuple[str, ...] = IS_MODES) -> None:
    """Raise a ValueError naming the key for a mode or threshold that cannot work."""
    if hp["rollout_is"] not in IS_MODES:
        raise ValueError(f"rollout_is='{hp['rollout_is']}' of loss '{loss}' is unknown; known: {', '.join(IS_MODES)}.")
    if hp["rollout_is"] not in allowed_is:
        raise ValueError(f"rollout_is='{hp['rollout_is']}': loss '{loss}' has no per-token policy-gradient term to "
                         f"reweight that way; it accepts rollout_is in {allowed_is}. Rejection (rollout_rs) works.")
    if hp["rollout_rs"] not in RS_MODES:
        raise ValueError(f"rollout_rs='{hp['rollout_rs']}' of loss '{loss}' is unknown; known: {', '.join(RS_MODES)}.")
    if not hp["rollout_is_threshold"] > 0:
        raise ValueError(f"rollout_is_threshold={hp['rollout_is_threshold']} must be > 0 (the truncation of w).")
    if not 0 <= hp["rollout_rs_threshold_lower"] < hp["rollout_rs_threshold"]:
        raise ValueError(f"rollout_rs_threshold_lower={hp['rollout_rs_threshold_lower']} and rollout_rs_threshold="
                         f"{hp['rollout_rs_threshold']}: need 0 <= lower < upper.")


def active(hp: Mapping) -> bool:
    return hp["rollout_is"] != "none" or hp["rollout_rs"] != "none"


def log_ratio(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """lr = (log pi_old - log pi_rollout) on valid tokens, 0 elsewhere. [B, T]"""
    if rollout.shape != old.shape:
        raise ValueError(f"rollout_logprobs has shape {tuple(rollout.shape)} but old_logprobs has "
                         f"{tuple(old.shape)}; both must be [B, T].")
    return (old - rollout).to(mask.dtype) * mask


def _seq_log_ratio(lr: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token (token) or broadcast per-sequence (sequence: sum, geometric: mean) log-ratio. [B, T]"""
    if mode == "token":
        return lr
    s = lr.sum(-1, keepdim=True)
    if mode == "geometric":
        s = s / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return s.expand_as(lr)


def is_weights(lr: torch.Tensor, mask: torch.Tensor, mode: str, threshold: float) -> torch.Tensor:
    """Truncated, detached IS weights (module docstring). [B, T], 0 on padding."""
    w = torch.exp(_seq_log_ratio(lr, mask, mode).clamp(-SAFETY, SAFETY))
    return (w.clamp(max=threshold) * mask).detach()


def keep_mask(lr: torch.Tensor, mask: torch.Tensor, mode: str, lower: float, upper: float) -> torch.Tensor:
    """1 where the token / sequence stays, 0 where it is rejected (module docstring). [B, T]"""
    x = _seq_log_ratio(lr, mask, mode)
    lo = math.log(lower) if lower > 0 else -math.inf
    return ((x >= lo) & (x <= math.log(upper))).to(mask.dtype) * mask


def corrected(inp, hp: Mapping):
    """``inp`` with rejected tokens masked out and ``is_weights`` set; unchanged when correction is off."""
    if not active(hp):
        return inp
    old = require(inp, "old_logprobs", "rollout correction", "pi_old of the sampled tokens")
    rollout = require(inp, "rollout_logprobs", "rollout correction", "the sampler's log-probs of its tokens")
    mask = inp.mask.to(inp.logprobs.dtype)
    lr = log_ratio(old, rollout, mask)
    if hp["rollout_rs"] != "none":
        mask = keep_mask(lr, mask, hp["rollout_rs"], hp["rollout_rs_threshold_lower"], hp["rollout_rs_threshold"])
    w = is_weights(lr, mask, hp["rollout_is"], hp["rollout_is_threshold"]) if hp["rollout_is"] != "none" else None
    return dataclasses.replace(inp, mask=mask, is_weights=w)


def stats(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, hp: Mapping) -> dict[str, float]:
    """Additive sums (and maxima, keys ending in ``_max``) of one rank's rows for the step's rollout_corr/ metrics:
    see ``finish_stats``. Computed whether or not the correction is on, so the mismatch is always visible."""
    mask = mask.to(torch.float64)
    lr = log_ratio(old.double(), rollout.double(), mask)
    seqs = mask.sum(-1) > 0
    out = {"tokens": float(mask.sum()), "seqs": float(seqs.sum()),
           "k3": float(((torch.exp(lr.clamp(-SAFETY, SAFETY)) - lr - 1.0) * mask).sum()),
           # log-perplexity of the rollout minus the trainer's, per sequence: mean_t (log pi_old - log pi_rollout)
           "log_ppl_diff": float((lr.sum(-1) / mask.sum(-1).clamp(min=1.0))[seqs].sum())}
    if hp["rollout_is"] != "none":
        raw = torch.exp(_seq_log_ratio(lr, mask, hp["rollout_is"]).clamp(-SAFETY, SAFETY))
        w = raw.clamp(max=hp["rollout_is_threshold"])
        out.update(is_sum=float((w * mask).sum()), is_max=float((w * mask).max()) if mask.any() else 0.0,
                   is_truncated=float(((raw > hp["rollout_is_threshold"]) & (mask > 0)).sum()))
    if hp["rollout_rs"] != "none":
        keep = keep_mask(lr, mask, hp["rollout_rs"], hp["rollout_rs_threshold_lower"], hp["rollout_rs_threshold"])
        out.update(rs_tokens=float((mask - keep).sum()), rs_seqs=float((seqs & (keep.sum(-1) == 0)).sum()))
    return out


def finish_stats(s: Mapping[str, float]) -> dict[str, float]:
    """The step's metrics from the summed ``stats`` of every rank (``is_max`` reduced by max)."""
    tok, seq = max(s["tokens"], 1.0), max(s["seqs"], 1.0)
    out = {"rollout_corr/k3_kl": s["k3"] / tok, "rollout_corr/log_ppl_diff": s["log_ppl_diff"] / seq}
    if "is_sum" in s:
        out.update({"rollout_corr/is_weight_mean": s["is_sum"] / tok, "rollout_corr/is_weight_max": s["is_max"],
                    "rollout_corr/is_truncated_frac": s["is_truncated"] / tok})
    if "rs_tokens" in s:
        out.update({"rollout_corr/rejected_token_frac": s["rs_tokens"] / tok,
                    "rollout_corr/rejected_seq_frac": s["rs_seqs"] / seq})
    return out
