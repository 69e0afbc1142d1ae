"""The SFT loss (megarl/losses/sft.py) against brute force, and its micro-batch additivity."""

from __future__ import annotations

import pytest
import torch

from megarl.losses import LossInput


def test_sft_nll_is_the_token_mean_and_adds_up_over_micro_batches():
    """Brute force: minus the mean log-prob over the valid tokens; split into two micro-batches with the summed
    counts, the parts' losses and gradients add up to the whole's."""
    from megarl.losses.sft import sft_loss

    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) > 0.3).double()
    loss = sft_loss()
    want = -sum(float(lp[b, t]) for b in range(4) for t in range(6) if mask[b, t]) / float(mask.sum())
    whole_lp = lp.clone().requires_grad_()
    whole, metrics = loss(LossInput(logprobs=whole_lp, mask=mask))
    assert float(whole.detach()) == pytest.approx(want, abs=1e-12) and metrics["nll"] == pytest.approx(want, abs=1e-12)
    whole.backward()
    parts_lp = lp.clone().requires_grad_()
    halves = [slice(0, 1), slice(1, 4)]
    counts = {"tokens": 0.0, "seqs": 0.0}
    for h in halves:
        for k, v in loss.counts(LossInput(logprobs=lp[h], mask=mask[h])).items():
            counts[k] += v
    total = sum(loss(LossInput(logprobs=parts_lp[h], mask=mask[h], counts=counts))[0] for h in halves)
    total.backward()
    assert float(total.detach()) == pytest.approx(want, abs=1e-12)
    assert torch.allclose(parts_lp.grad, whole_lp.grad, atol=1e-15)
    with pytest.raises(ValueError, match="unknown hyperparameter 'clip_low' of the SFT loss"):
        sft_loss(clip_low=0.2)
