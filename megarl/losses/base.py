"""What every policy loss shares: the input record, token aggregation and global normalisers.

Gradient accumulation and data parallelism must not change the objective. Every loss here is therefore
written as ``sum over the local tokens (or sequences, or pairs) / a GLOBAL count``. The counts are additive:
the caller computes ``loss.counts(inp)`` on every micro-batch of a mini-batch, sums them over micro-batches and
data-parallel ranks, and passes the sums back as ``LossInput.counts``. Then

    sum_{micro-batches, ranks} loss(micro-batch)  ==  loss(whole mini-batch)

exactly, values and gradients. With ``counts=None`` a loss normalises by its own input (one micro-batch = the
whole mini-batch), which is what a single-process caller wants.

Aggregation modes (docs/algorithms.md, "Conventions"; L is a [B, T] per-token loss, m the mask):

    token-mean               sum(L*m) / N_tokens
    seq-mean-token-sum       sum_b sum_t L*m / N_seqs
    seq-mean-token-mean      sum_b (sum_t L*m / sum_t m) / N_seqs
    seq-mean-token-sum-norm  sum_b sum_t L*m / (N_seqs * norm_len)     (Dr. GRPO; norm_len is a constant, the
                                                                         generation budget, not a batch max)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclasses.dataclass
class LossInput:
    """Tensors of one (micro-)batch of responses. Shapes: B responses, T response tokens.

    Fields a loss does not use may be None; a loss that needs a missing field raises ValueError naming it.
    """

    logprobs: torch.Tensor  # [B, T] log pi_theta(y_t), carries the gradient
    mask: torch.Tensor  # [B, T] 1 on valid response tokens
    old_logprobs: torch.Tensor | None = None  # [B, T] log pi_old (the rollout policy), no grad
    ref_logprobs: torch.Tensor | None = None  # [B, T] log pi_ref, no grad
    advantages: torch.Tensor | None = None  # [B, T]
    rewards: torch.Tensor | None = None  # [B] scalar outcome reward
    group_ids: torch.Tensor | None = None  # [B] prompt / group id
    levels: torch.Tensor | None = None  # [B] TRPA preference level, 1 = best
    v_star: torch.Tensor | None = None  # [B] A*-PO optimal value of the response's prompt
    entropy: torch.Tensor | None = None  # [B, T] token entropy of pi_theta
    rollout_logprobs: torch.Tensor | None = None  # [B, T] log-probs of the sampled tokens under the sampling engine
    is_weights: torch.Tensor | None = None  # [B, T] rollout-correction IS weights (set by losses.correction)
    selected: torch.Tensor | None = None  # [B, T] 1 on tokens a covariance loss singled out (losses.cov)
    counts: Mapping[str, float] | None = None  # global normalisers, see the module docstring


def require(inp: LossInput, field: str, loss: str, why: str = "") -> torch.Tensor:
    """Return ``inp.<field>`` or raise a ValueError that names the loss, the field and the fix."""
    value = getattr(inp, field)
    if value is None:
        reason = f" ({why})" if why else ""
        raise ValueError(f"loss '{loss}' needs LossInput.{field}{reason}; it was None. Pass it in the LossInput.")
    return value


def token_mask(inp: LossInput) -> torch.Tensor:
    """The mask as the log-prob dtype, checked against the log-prob shape."""
    if inp.mask.shape != inp.logprobs.shape:
        raise ValueError(f"LossInput.mask has shape {tuple(inp.mask.shape)} but logprobs has "
                         f"{tuple(inp.logprobs.shape)}; both must be [B, T].")
    return inp.mask.to(inp.logprobs.dtype)


def local_counts(mask: torch.Tensor) -> dict[str, float]:
    """Additive normalisers of one micro-batch: valid tokens, and sequences with at least one valid token (a row
    emptied by padding or by rollout-correction rejection is not a sequence of the mean)."""
    return {"tokens": float(mask.sum()), "seqs": float((mask.sum(-1) > 0).sum())}


def is_weighted(pg_mat: torch.Tensor, inp: LossInput) -> torch.Tensor:
    """The per-token policy-gradient term times the rollout-correction IS weights, when there are any."""
    return pg_mat if inp.is_weights is None else pg_mat * inp.is_weights.to(pg_mat.dtype)


def counts_of(inp: LossInput, local: Mapping[str, float]) -> Mapping[str, float]:
    """The global counts when the caller passed them, else this batch's own."""
    if inp.counts is None:
        return local
    missing = [k for k in local if k not in inp.counts]
    if missing:
        raise ValueError(f"LossInput.counts lacks {missing}; compute it as the sum of loss.counts(micro_batch) "
                         f"over all micro-batches and data-parallel ranks.")
    return inp.counts


def agg(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, counts: Mapping[str, float],
        norm_len: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar with a GLOBAL denominator (module docstring)."""
    if mode == "token-mean":
        return (loss_mat * mask).sum() / max(counts["tokens"], 1.0)
    if mode == "seq-mean-token-sum":
        return (loss_mat * mask).sum() / max(counts["seqs"], 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
        return per_seq.sum() / max(counts["seqs"], 1.0)
    if mode == "seq-mean-token-sum-norm":
        length = float(norm_len) if norm_len is not None else float(mask.shape[-1])
        return (loss_mat * mask).sum() / (max(counts["seqs"], 1.0) * length)
    raise ValueError(f"Unknown aggregation mode '{mode}'. Known: {', '.join(AGG_MODES)}.")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, counts: Mapping[str, float] | None = None) -> float:
    """A metric: the mean of x over valid tokens, as a float. With the global ``counts``, this micro-batch's share
    of the mini-batch's token mean (its sum over the GLOBAL token count), so that, like the loss, the shares add
    up to the mini-batch's value over any number of micro-batches and data-parallel ranks."""
    total = float((x.detach() * mask).sum())
    n = counts["tokens"] if counts is not None else float(mask.sum())
    return total / n if n > 0 else 0.0


def seq_mean(x: torch.Tensor, mask: torch.Tensor, counts: Mapping[str, float] | None = None) -> float:
    """A metric: the mean of a per-response value x [B] over the responses with a valid token; with the global
    ``counts``, this micro-batch's additive share of it (``masked_mean``)."""
    rows = mask.sum(-1) > 0
    total = float(x.detach()[rows].sum())
    n = counts["seqs"] if counts is not None else float(rows.sum())
    return total / n if n > 0 else 0.0
