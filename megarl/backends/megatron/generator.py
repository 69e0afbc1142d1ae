"""Native Megatron generator: KV-cache sampling on the TP/PP model itself (the default without vLLM).

For each prompt, its n samples form one batch that shares a megatron-core ``StaticInferenceContext`` (the KV
cache): one prefill pass over the prompt, then one single-token pass per step. Passes go through the same
``forward_backward(forward_only=True)`` entry point as training, so pipeline stages exchange activations as usual
and each stage caches its own layers. The last stage samples from the full-vocabulary logits (gathered over TP)
and broadcasts the tokens to the other stages; every TP rank draws from the same seeded generator, so all ranks
agree on every token.

Because it runs the policy's own modules, its weights are always the trainer's: ``load_weights`` exists for a
separate inference copy and checks every tensor through the conversion key map.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megarl.backends.megatron.forward import forward_backward
from megarl.backends.megatron.weights import load_hf_weights
from megarl.backends.protocols import Completion, SamplingParams
from megarl.convert.arch import ModelArch
from megarl.rollout.sampling import sample_tokens


def broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the last pipeline stage holds it, in place on every stage of this pipeline (same shape/dtype)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return t


class MegatronGenerator:
    """``Generator`` over a Megatron model at any TP/PP layout. Every rank of the model must call ``generate``."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch):
        self.model, self.arch = model, arch

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, ctx: StaticInferenceContext) -> torch.Tensor | None:
        """Full-vocabulary fp32 logits of the last position [n, V] on the last stage, None elsewhere."""
        mb = {"input_ids": ids, "position_ids": positions,
              "model_kwargs": {"inference_context": ctx, "runtime_gather_output": True}}
        out = forward_backward(self.model, [mb], lambda logits, _: logits[:, -1, : self.arch.vocab_size].float(),
                               forward_only=True)
        return out[0] if out else None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        self.model.eval()
        results = []
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
            if len(prompt) + sampling.max_tokens > self.arch.max_position_embeddings:
                raise ValueError(f"prompt {i} ({len(prompt)} tokens) + rollout.max_tokens ({sampling.max_tokens}) "
                                 f"exceeds the model's {self.arch.max_position_embeddings} positions.")
            gen = torch.Generator().manual_seed((sampling.seed if sampling.seed is not None else 0) * 100_003 + i)
            results.append(self._generate_one(prompt, n, sampling, gen))
        return results

    def _generate_one(self, prompt: list[int], n: int, sampling: SamplingParams, gen) -> list[Completion]:
        ctx = StaticInferenceContext(n, len(prompt) + sampling.max_tokens)
        ids = torch.tensor([prompt] * n)
        positions = torch.arange(len(prompt)).unsqueeze(0).expand(n, -1)
        tokens, logprobs = [], []
        done = torch.zeros(n, dtype=torch.bool)
        finish = ["length"] * n
        for step in range(sampling.max_tokens):
            logits = self._step(ids, positions, ctx)
            ctx.sequence_len_offset += ids.shape[1]
            ctx.enable_decode_mode()
            picked = torch.zeros(2, n, dtype=torch.float64)
            if logits is not None:
                tok, lp = sample_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p, gen)
                picked = torch.stack([tok.double(), lp.double()])
            picked = broadcast_from_last_stage(picked)
            tok, lp = picked[0].long(), picked[1]
            tokens.append(tok)
            logprobs.append(lp)
            for r in range(n):
                if not done[r] and int(tok[r]) in sampling.stop_ids:
                    done[r], finish[r] = True, "stop"
            if bool(done.all()):
                break
            ids = tok.unsqueeze(1)
            positions = torch.full((n, 1), ctx.sequence_len_offset)
        toks, lps = torch.stack(tokens, 1), torch.stack(logprobs, 1)  # [n, steps]
        out = []
        for r in range(n):
            length = toks.shape[1]
            if finish[r] == "stop":  # keep the stop token, drop what the finished row sampled afterwards
                length = next(j for j in range(toks.shape[1]) if int(toks[r, j]) in sampling.stop_ids) + 1
            out.append(Completion(toks[r, :length].tolist(), lps[r, :length].tolist(), finish[r]))
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        named = dict(weights)
        load_hf_weights(self.model, self.arch, named.__getitem__)

    def sleep(self) -> None:  # the KV cache lives only inside generate(); nothing is held between calls
        pass

    def wake_up(self) -> None:
        pass
