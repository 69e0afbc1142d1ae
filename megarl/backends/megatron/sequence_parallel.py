"""Sequence parallelism (``parallel.sp``): outside the tensor-parallel matmuls, each TP rank keeps only its
1/tp slice of the sequence (megatron-core's ``TransformerConfig.sequence_parallel``; docs/sequence_parallel.md).

What megatron-core does itself: the embedding reduce-scatters its output along the sequence, every column-parallel
linear all-gathers its input first and every row-parallel linear reduce-scatters its output, and MoE layers route
their own slice (megatron-core trains MoE layers at tp > 1 only this way). Norms, residual adds and the router then
see s/tp tokens per rank, so activation memory outside attention and the MLP falls by tp.

What megarl adds here, for the local (pure torch) layer spec and its own entry points:

- ``TorchRMSNorm`` / ``SequenceParallelRMSNorm``: megatron-core's ``WrappedTorchNorm`` refuses sequence
  parallelism, since a norm that sees only its slice computes only part of its weight's gradient. These are
  ``torch.nn.RMSNorm`` (the same arithmetic) built from megatron-core's arguments; the residual-stream norms mark
  their weight ``sequence_parallel``, which makes ``finalize_model_grads`` sum its gradient over the TP ranks (the
  query/key norms run inside attention on whole sequences of a rank's heads, and megatron-core already sums
  their gradients over TP by name). Used at every setting, so the local spec has one norm.
- ``gather_hidden``: the last stage's hidden states [s/tp, b, H] -> [s, b, H] for the fused output layer, which
  takes whole sequences (``forward.hidden_states_out``).
- ``whole_tp_sequences``: sequence parallelism off for a body (the native KV-cache generator decodes one token
  per row, which cannot be split over TP ranks).

The micro-batch length must be a multiple of tp (``forward.sequence_multiple``; the packer and the right-padded
batcher round up to it).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build


class TorchRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron-core's norm constructor (config, hidden_size, eps, ...)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"TorchRMSNorm builds RMSNorm layers, the config asks for {config.normalization}.")
        super().__init__(normalized_shape=hidden_size, eps=eps)


class SequenceParallelRMSNorm(TorchRMSNorm):
    """A residual-stream norm: under sequence parallelism its weight's gradient is summed over the TP ranks."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config, hidden_size, eps, **unused)
        self.weight.sequence_parallel = config.sequence_parallel


def local_block_spec(layer_spec, config) -> TransformerBlockSubmodules:
    """The local layer spec with megarl's torch norms in place of ``WrappedTorchNorm``, as this pipeline stage's
    block (its layers and the final norm)."""
    layer = layer_spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(layer, name) is WrappedTorchNorm:
            setattr(layer, name, SequenceParallelRMSNorm)
    attention = layer.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attention, name) is WrappedTorchNorm:
            setattr(attention, name, TorchRMSNorm)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)


def gather_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """[s/tp, b, H] on each TP rank -> [s, b, H] on all. Backward: this rank's slice of the gradient, which the
    fused output layer has already summed over TP (hence ``tensor_parallel_output_grad=False``: no reduce-scatter)."""
    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                group=parallel_state.get_tensor_model_parallel_group())


# what megatron-core's modules copy from the config at construction and read in forward
_MODULE_FLAGS = ("sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def whole_tp_sequences(gpt: torch.nn.Module):
    """Inside, the GPTModel ``gpt`` runs without sequence parallelism: every TP rank holds whole sequences, as at
    ``parallel.sp=false`` (megatron-core's MoE layers then route each token on every TP rank, which is exact).
    For inference only: the gradient reductions chosen at construction still assume sequence parallelism."""
    config = gpt.config
    if not config.sequence_parallel:
        yield
        return
    saved = [(m, flag, getattr(m, flag)) for m in gpt.modules() for flag in _MODULE_FLAGS
             if isinstance(getattr(m, flag, None), bool) and getattr(m, flag)]
    config.sequence_parallel = False  # one TransformerConfig is shared by the model's modules
    for m, flag, _ in saved:
        setattr(m, flag, False)
    try:
        yield
    finally:
        config.sequence_parallel = True
        for m, flag, value in saved:
            setattr(m, flag, value)
