"""The one forward/backward entry point over Megatron's pipeline schedules, with swappable post-processors.

A post-processor turns the last stage's vocab-parallel logits of one micro-batch into either

- a loss: ``(loss scalar, {"metric": float, ...})`` -- the loss must already carry its global normaliser
  (megarl losses do, see ``megarl.losses.base``), so nothing here divides by the number of micro-batches
  (``TransformerConfig.calculate_per_token_loss=True`` switches Megatron's own division off); or
- data to collect (forward_only): any tensor, returned per micro-batch on the last pipeline stage.

Logits are [b, s, V_padded / tp] with columns past the real vocabulary still present; ``token_logprobs`` and
``gather_logits`` exclude them. Inside ``hidden_states_out(model)`` the last stage returns its final hidden states
[b, s, H] instead (the output layer is bypassed), for ``token_logprobs`` with ``impl="fused_linear"``, which applies
the output layer itself, chunked, to the positions it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarl.backends.megatron import context_parallel as cp
from megarl.backends.megatron import moe
from megarl.backends.megatron.model import unwrap
from megarl.backends.megatron.sequence_parallel import gather_hidden
from megarl.kernels import token_logprobs_entropy

PostProcess = Callable[[torch.Tensor, dict[str, Any]], Any]


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)


def forward_backward(model: torch.nn.Module, micro_batches: list[dict[str, Any]], post: PostProcess, *,
                     forward_only: bool) -> list[Any]:
    """Run all micro-batches through the pipeline. Each micro-batch holds ``input_ids`` [b, s] (the same b and s
    for all of them: pipeline stages exchange fixed shapes), optionally ``position_ids``, ``padding`` ([b, s] bool,
    True at padding: a MoE model's router losses leave those tokens out when training) and ``model_kwargs``
    (extra GPTModel.forward arguments, e.g. a KV-cache inference context), plus whatever ``post`` reads.

    Returns, on the last pipeline stage, one entry per micro-batch: the metrics dict (training) or the
    collected data (forward_only). Other stages get an empty list. Gradients accumulate in ``param.grad``
    (or the DDP buffers).

    At parallel.cp > 1 each rank runs its part of every sequence (padded to a multiple of 2 cp, or of each packed
    segment; ``context_parallel.shard_inputs``): ``post`` gets this rank's [b, S/cp, ...] output and maps
    positions with ``context_parallel.pick_local``. Under ``context_parallel.whole_sequences`` (generation)
    nothing is sharded.

    At expert parallelism (ep > 1) every rank of the expert-parallel group runs as many passes as the busiest one
    (``moe.passes_in_step``): the others add padding passes (a copy of their first micro-batch, or 8 pad tokens)
    whose output is dropped, whose router losses are off (``moe.set_padding_pass``, in their forward and their
    backward) and whose loss is zero.
    """
    real = len(micro_batches)
    padding = moe.passes_in_step(real) - real
    if not real and not padding:
        return []
    if padding:
        filler = {k: v for k, v in micro_batches[0].items() if k in ("input_ids", "position_ids", "model_kwargs")} \
            if real else {"input_ids": torch.zeros(1, 8 * sequence_multiple(model), dtype=torch.long)}
        micro_batches = [*micro_batches, *[{**filler, "_padding": True}] * padding]
    b, s = micro_batches[0]["input_ids"].shape
    for mb in micro_batches:
        if tuple(mb["input_ids"].shape) != (b, s):
            raise ValueError(f"micro-batches must share one shape for the pipeline, got {(b, s)} and "
                             f"{tuple(mb['input_ids'].shape)}; pad them to a common length.")
    if s % sequence_multiple(model):
        raise ValueError(f"micro-batch length {s} is not a multiple of {sequence_multiple(model)}: under sequence "
                         f"parallelism (parallel.sp) each TP rank takes 1/tp of every sequence (and 1/(2 cp) of "
                         f"each at context parallelism); pad it (rollout/packing.py, rollout/batch.py: multiple=).")

    split = unwrap(model).config.context_parallel_size  # 1 under whole_sequences
    seq_length = cp.padded_length(s, split) if split > 1 else s * cp.cp_size()  # Megatron divides it by cp

    def step(data_iterator: Iterable, mdl: torch.nn.Module):
        mb = next(data_iterator)
        ids = mb["input_ids"]
        pos = mb.get("position_ids", position_ids_for(ids))
        padding = None if forward_only else mb.get("padding")
        if split > 1:
            ids, pos, padding = cp.shard_inputs(ids, pos, mb.get("model_kwargs", {}).get("packed_seq_params"), padding)
        kwargs = {**mb.get("model_kwargs", {}), **moe.padding_kwargs(mdl, padding)}
        moe.set_padding_pass(mdl, bool(mb.get("_padding")))
        logits = moe.mark_pass(mdl, mdl(ids, pos, attention_mask=None, **kwargs), bool(mb.get("_padding")))

        def loss_func(output: torch.Tensor):
            if mb.get("_padding"):
                return output.sum() * 0.0, 1, ({"data": None} if forward_only else {})
            if forward_only:
                return output.new_zeros(()), 1, {"data": post(output, mb)}
            loss, metrics = post(output, mb)
            return loss, 1, metrics

        return logits, loss_func

    try:
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=b, forward_only=forward_only)
    finally:
        moe.set_padding_pass(model, False)
    if not parallel_state.is_pipeline_last_stage():
        return []
    return [o["data"] for o in out[:real]] if forward_only else list(out[:real])


def sequence_multiple(model: torch.nn.Module) -> int:
    """What a micro-batch's length must be a multiple of: tp under sequence parallelism (2 cp x tp at context
    parallelism, whose rank parts must split evenly over TP too), else 1 (context parallelism alone pads itself)."""
    config = unwrap(model).config
    if not config.sequence_parallel:
        return 1
    cp_factor = 2 * config.context_parallel_size if config.context_parallel_size > 1 else 1
    return config.tensor_model_parallel_size * cp_factor


def gather_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab_size] from the TP shards (tests, sampling; not the training path)."""
    full = tensor_parallel.gather_from_tensor_model_parallel_region(
        logits, group=parallel_state.get_tensor_model_parallel_group())
    return full[..., :vocab_size]


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The last stage's output-layer weight shard [V_padded / tp, H] (the tied embedding copy when tied)."""
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def hidden_states_out(model: torch.nn.Module):
    """For the body, the model's last stage returns its final (normed) hidden states [b, s, H] where it returned
    logits: its output layer passes its input through. Gradients reach the output weight through whoever applies
    it (``token_logprobs(..., weight=output_weight(model))``); the TP all-reduce of the hidden states' gradient
    that ColumnParallelLinear would do is done by the fused kernel. Under sequence parallelism the hidden states
    are gathered over TP first (each rank holds 1/tp of the sequence), as ColumnParallelLinear would."""
    gpt = unwrap(model)
    if not gpt.post_process:
        yield
        return
    layer = gpt.output_layer

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        return (gather_hidden(hidden_states) if layer.sequence_parallel else hidden_states), None

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward


def token_logprobs(out: torch.Tensor, targets: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                   impl: str = "auto", weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy) per position, differentiable -> [b, s] each, from ``out`` = vocab-parallel logits
    [b, s, V/tp], or with ``weight`` (the output weight shard [V/tp, H]) hidden states [b, s, H].

    Goes through ``megarl.kernels`` over the TP group (hidden states: ``fused_linear``; logits: ``impl``, whose
    auto is Triton on CUDA and the torch reference elsewhere); the padded vocabulary columns are excluded there.
    """
    b, s, width = out.shape
    group = parallel_state.get_tensor_model_parallel_group()
    if weight is not None:
        lp, ent = token_logprobs_entropy(hidden=out.reshape(b * s, width).to(weight.dtype), weight=weight,
                                         targets=targets.reshape(-1), temperature=temperature,
                                         vocab_size=vocab_size, group=group, impl=impl)
    else:
        lp, ent = token_logprobs_entropy(logits=out.reshape(b * s, width), targets=targets.reshape(-1),
                                         temperature=temperature, vocab_size=vocab_size, group=group, impl=impl)
    return lp.view(b, s), ent.view(b, s)
