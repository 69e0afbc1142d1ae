"""Native Megatron generator: KV-cache sampling on the TP/PP model itself (the default without vLLM).

Prompts of equal length and their n samples each form one batch (up to ``max_batch_rows`` rows) that shares a
megatron-core ``StaticInferenceContext`` (the KV cache): one prefill pass over the prompts, then one single-token
pass per step. Each prompt's samples are drawn from its own seeded generator, so they do not depend on the batch. Passes go through the same
``forward_backward(forward_only=True)`` entry point as training, so pipeline stages exchange activations as usual
and each stage caches its own layers. The last stage samples from the full-vocabulary logits (gathered over TP)
and broadcasts the tokens to the other stages; every TP rank draws from the same seeded generator, so all ranks
agree on every token. At context parallelism (cp > 1) every rank of a context-parallel group runs the whole
sequences (megatron-core's KV-cache inference has no CP) and draws the same tokens: correct, cp times the work;
vLLM is the sampler at scale. At expert parallelism (ep > 1) the ranks of an expert-parallel group hold different
prompts but every pass is a collective over them: they run the same number of batches (filler batches of one
token where a rank has fewer) and each batch ends when every rank's rows are done (``moe.all_done``).

Because it runs the policy's own modules, its weights are always the trainer's: ``load_weights`` exists for a
separate inference copy and checks every tensor through the conversion key map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megarl.backends.megatron import moe
from megarl.backends.megatron.context_parallel import whole_sequences
from megarl.backends.megatron.sequence_parallel import whole_tp_sequences
from megarl.backends.megatron.forward import forward_backward
from megarl.backends.megatron.model import unwrap
from megarl.backends.megatron.weights import load_hf_weights
from megarl.backends.protocols import Completion, GeneratesNow, SamplingParams
from megarl.convert.arch import ModelArch
from megarl.distributed import comm_device
from megarl.rollout.sampling import sample_tokens


def broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the last pipeline stage holds it, in place on every stage of this pipeline (same shape/dtype)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        on_comm = t.to(comm_device(group))
        dist.broadcast(on_comm, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
        t.copy_(on_comm)
    return t


class MegatronGenerator(GeneratesNow):
    """``Generator`` over a Megatron model at any TP/PP layout. Every rank of the model must call ``generate``."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch, max_batch_rows: int = 256):
        self.model, self.arch, self.max_batch_rows = model, arch, max_batch_rows

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, ctx: StaticInferenceContext) -> torch.Tensor | None:
        """Full-vocabulary fp32 logits of the last position [n, V] on the last stage, None elsewhere. Tokens are
        sampled on the host (each prompt's seeded CPU generator), so the logits come back there."""
        dev = next(self.model.parameters()).device
        mb = {"input_ids": ids.to(dev), "position_ids": positions.to(dev),
              "model_kwargs": {"inference_context": ctx, "runtime_gather_output": True}}
        out = forward_backward(self.model, [mb], lambda logits, _: logits[:, -1, : self.arch.vocab_size].float(),
                               forward_only=True)
        return out[0].cpu() if out else None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        self.model.eval()
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
            if len(prompt) + sampling.max_tokens > self.arch.max_position_embeddings:
                raise ValueError(f"prompt {i} ({len(prompt)} tokens) + rollout.max_tokens ({sampling.max_tokens}) "
                                 f"exceeds the model's {self.arch.max_position_embeddings} positions.")
        if seeds is None:
            seeds = sampling.prompt_seeds(len(prompts))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt.")
        # prompts of equal length share one batch (one prefill, one decode pass per token for all their samples);
        # batch size and position do not change a prompt's samples, which come from its own seeded generator
        by_len: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_len.setdefault(len(prompt), []).append(i)
        results: list[list[Completion]] = [[] for _ in prompts]
        per_batch = max(1, self.max_batch_rows // n)
        chunks = [idx[start: start + per_batch] for idx in by_len.values() for start in range(0, len(idx), per_batch)]
        rounds = moe.passes_in_step(len(chunks))  # ep > 1: agreed before any pass, whose collectives it would meet
        with self._whole():
            for chunk in chunks:
                gens = [torch.Generator().manual_seed(seeds[i]) for i in chunk]
                batch = self._generate_batch([prompts[i] for i in chunk], n, sampling, gens)
                for i, out in zip(chunk, batch):
                    results[i] = out
            for _ in range(rounds - len(chunks)):  # keep pace with the busiest rank of the expert-parallel group
                self._generate_batch([[0]], 1, sampling, [torch.Generator()], filler=True)
        return results

    @contextlib.contextmanager
    def _whole(self):
        """Whole sequences on every rank: at cp > 1 every rank of the group samples the same, and under sequence
        parallelism every TP rank holds every token (a decode step's one token per row cannot be split)."""
        with whole_sequences(unwrap(self.model)), whole_tp_sequences(unwrap(self.model)):
            yield

    def _generate_batch(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                        gens: list[torch.Generator], filler: bool = False) -> list[list[Completion]]:
        """n samples of each of ``prompts`` (all of one length) in one KV-cached batch of len(prompts) * n rows
        (``filler``: a batch run only to keep pace with the other expert-parallel ranks; done from the start)."""
        rows = len(prompts) * n
        ctx = StaticInferenceContext(rows, len(prompts[0]) + sampling.max_tokens)
        ids = torch.tensor([p for p in prompts for _ in range(n)])
        positions = torch.arange(len(prompts[0])).unsqueeze(0).expand(rows, -1)
        tokens, logprobs = [], []
        done = torch.full((rows,), filler, dtype=torch.bool)
        stop = torch.tensor(sorted(set(sampling.stop_ids)), dtype=torch.long)
        for step in range(sampling.max_tokens):
            logits = self._step(ids, positions, ctx)
            ctx.sequence_len_offset += ids.shape[1]
            ctx.enable_decode_mode()
            picked = torch.zeros(2, rows, dtype=torch.float64)
            if logits is not None:
                for j, gen in enumerate(gens):  # each prompt's samples from its own generator
                    tok, lp = sample_tokens(logits[j * n: (j + 1) * n], sampling.temperature, sampling.top_k,
                                            sampling.top_p, gen)
                    picked[:, j * n: (j + 1) * n] = torch.stack([tok.double(), lp.double()])
            picked = broadcast_from_last_stage(picked)
            tok, lp = picked[0].long(), picked[1]
            tokens.append(tok)
            logprobs.append(lp)
            done |= torch.isin(tok, stop)
            if moe.all_done(bool(done.all())):
                break
            ids = tok.unsqueeze(1)
            positions = torch.full((rows, 1), ctx.sequence_len_offset)
        toks, lps = torch.stack(tokens, 1), torch.stack(logprobs, 1)  # [rows, steps]
        out = []
        for r in range(rows):
            hits = torch.isin(toks[r], stop).nonzero()
            # keep the stop token, drop what a finished row sampled afterwards
            length, finish = (int(hits[0]) + 1, "stop") if len(hits) else (toks.shape[1], "length")
            out.append(Completion(toks[r, :length].tolist(), lps[r, :length].tolist(), finish))
        return [out[j * n: (j + 1) * n] for j in range(len(prompts))]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        named = dict(weights)
        load_hf_weights(self.model, self.arch, named.__getitem__)

    stale = False  # it runs the policy's own modules: nothing to sync

    def sync(self) -> dict[str, float]:
        return {}

    def sleep(self) -> None:  # the KV cache lives only inside generate(); nothing is held between calls
        pass

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        pass
