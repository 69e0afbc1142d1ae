"""Greedy decoding on a TP/PP Megatron model by full recomputation: the simple, obviously-correct generator.

Each step runs the whole sequence through ``forward_backward(forward_only=True)`` and takes the arg-max of the
last position, so it works at any TP/PP layout with no cache to get wrong. It is the reference that the
KV-cache generator and vLLM are checked against, and what the demo uses; it is O(n^2) in the response length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megarl.backends.megatron.forward import forward_backward, gather_logits
from megarl.convert.arch import ModelArch


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return t


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, arch: ModelArch, prompt_ids: list[int], max_new_tokens: int,
                    stop_ids: tuple[int, ...] = ()) -> list[int]:
    """The greedy continuation of one prompt (stop token included if hit). Every rank must call it."""
    model.eval()
    seq = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        ids = torch.tensor([seq])
        last = forward_backward(model, [{"input_ids": ids}],
                                lambda logits, mb: gather_logits(logits[:, -1:], arch.vocab_size), forward_only=True)
        nxt = torch.tensor([int(last[0].argmax())]) if last else torch.zeros(1, dtype=torch.long)
        token = int(_broadcast_from_last_stage(nxt)[0])
        out.append(token)
        seq.append(token)
        if token in stop_ids:
            break
    return out
