"""Token sampling from full-vocabulary logits: temperature, top-k, top-p, seeded. Pure torch."""

from __future__ import annotations

import torch


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] -> (tokens [n], logprobs [n]).

    The reported log-prob is that of the temperature-scaled distribution before top-k/top-p filtering (what the
    trainer recomputes), and of the plain distribution for greedy decoding (temperature 0).
    """
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, -1)
        tokens = logp.argmax(-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)  # [n, V]
    masked = logp
    if top_k and top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(masked, descending=True, dim=-1)
        cum = torch.cumsum(sorted_lp.exp(), -1)
        drop_sorted = (cum - sorted_lp.exp()) >= top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        masked = masked.masked_fill(drop, float("-inf"))
    probs = torch.softmax(masked, -1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
