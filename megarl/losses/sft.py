"""Supervised fine-tuning: the negative log-likelihood of target responses (``megarl sft``, a warm-up before RL).

    L = - sum_{b,t} m_bt * log pi_theta(y_bt | x_b, y_b<t) / N      (token-mean: N = target tokens of the step)

It runs through the same policy, micro-batching, packing and parallel layout as the RL losses, with the global
normalisers of ``megarl.losses.base``. It is not in the RL registry (``algo.loss``): it reads no reward, and a
policy trained on its own samples with it would only sharpen what it already says.
"""

from __future__ import annotations

import torch

from megarl.losses import correction
from megarl.losses.base import LossInput, agg, counts_of, local_counts, masked_mean, token_mask
from megarl.losses.registry import LossSpec, PolicyLoss

SFT_DEFAULTS = {"agg_mode": "token-mean"}


def nll(inp: LossInput, agg_mode: str = "token-mean") -> tuple[torch.Tensor, dict[str, float]]:
    """The mean negative log-likelihood of the target tokens (module docstring); metrics: ``nll`` (the same
    token mean whatever ``agg_mode``, this micro-batch's share of the step's)."""
    mask = token_mask(inp)
    counts = counts_of(inp, local_counts(mask))
    loss = agg(-inp.logprobs, mask, agg_mode, counts)
    return loss, {"nll": masked_mean(-inp.logprobs, mask, counts)}


def sft_loss(**overrides) -> PolicyLoss:
    """The SFT objective as a ``PolicyLoss`` (what ``Policy.train_step`` takes); ``agg_mode`` may be overridden."""
    bad = [k for k in overrides if k not in SFT_DEFAULTS]
    if bad:
        raise ValueError(f"unknown hyperparameter '{bad[0]}' of the SFT loss; it has {', '.join(SFT_DEFAULTS)}.")
    spec = LossSpec(nll, SFT_DEFAULTS, advantage=None, reference="none", rollout_is=("none",))
    return PolicyLoss("sft", {**SFT_DEFAULTS, **overrides, **correction.CORRECTION_DEFAULTS}, spec)
