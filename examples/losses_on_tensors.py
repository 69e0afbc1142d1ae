"""The loss API on plain tensors: group advantages, a policy loss and its gradient, and why every loss divides by
global counts (splitting a batch into micro-batches gives the same gradient).

    .venv/bin/python examples/losses_on_tensors.py
"""

from __future__ import annotations

import torch

from megarl.advantages import compute_advantages
from megarl.losses import LossInput, build_loss


def main() -> dict[str, float]:
    torch.manual_seed(0)
    B, T = 8, 6  # 2 prompts x 4 responses, 6 response tokens at most
    mask = (torch.arange(T)[None, :] < torch.tensor([6, 3, 5, 6, 2, 6, 4, 6])[:, None]).float()
    old = -torch.rand(B, T) - 0.5  # log pi_old of the sampled tokens
    logprobs = (old + 0.05 * torch.randn(B, T)).requires_grad_(True)  # log pi_theta, the only tensor with a grad
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])

    adv = compute_advantages("dr_grpo", rewards=rewards, group_ids=groups, mask=mask)  # r - group mean
    loss_fn = build_loss("dapo", rollout_is="token")  # any name of megarl.losses.LOSSES, any hyperparameter
    inp = LossInput(logprobs=logprobs, old_logprobs=old, mask=mask, advantages=adv,
                    rollout_logprobs=old - 0.01)  # the sampler's log-probs, for rollout correction
    loss, metrics = loss_fn(inp)
    loss.backward()
    whole = logprobs.grad.clone()
    print(f"dapo loss {loss.item():.5f}  " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    # the same batch as two micro-batches: sum the counts of both, pass them back, and sum the gradients
    logprobs.grad = None
    parts = [slice(0, 4), slice(4, 8)]
    pieces = [LossInput(logprobs=logprobs[p], old_logprobs=old[p], mask=mask[p], advantages=adv[p],
                        rollout_logprobs=old[p] - 0.01) for p in parts]
    counts = {k: sum(loss_fn.counts(x)[k] for x in pieces) for k in loss_fn.counts(pieces[0])}
    for x in pieces:
        x.counts = counts
        loss_fn(x)[0].backward()
    gap = (logprobs.grad - whole).abs().max().item()
    print(f"micro-batched gradient differs from the whole batch's by {gap:.2e}")
    return {"loss": loss.item(), "gap": gap}


if __name__ == "__main__":
    main()
