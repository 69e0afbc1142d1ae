"""Per-token KL estimators (Schulman, "Approximating KL divergence", 2020).

All three take samples y ~ pi_theta (the policy that generated the tokens at the current step, in practice
pi_old ~ pi_theta) and estimate the REVERSE divergence KL(pi_theta || pi_ref). With d = log pi_ref - log pi_theta:

    k1 = -d                     unbiased, high variance, can be negative       (verl "kl")
    k2 = d^2 / 2                biased, low variance                           (verl "mse")
    k3 = exp(d) - d - 1         unbiased, low variance, always >= 0            (verl "low_var_kl")

Direction trap (docs/algorithms.md, "Conventions"): RPG's UFKL term ``w - log w - 1`` with w = pi_theta/pi_old
has the same shape as k3 but the ratio flipped, i.e. it estimates the FORWARD KL(pi_old || pi_theta). Never swap the two:
``k3(logprobs, ref)`` != ``k3(ref, logprobs)``.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs. [B, T] -> [B, T].

    k3 clamps d to [-20, 20] and the result to [-10, 10], as verl does, so one wild token cannot blow up a step.
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "k3":
        d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
        return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"Unknown KL estimator '{kind}'. Known: {', '.join(KL_ESTIMATORS)}.")
