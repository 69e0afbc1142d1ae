"""Packed sequences through megatron-core, behind one interface: megatron-core's ``PackedSeqParams`` in the THD
format (``cu_seqlens`` of the samples laid back to back, ``megarl/rollout/packing.py``).

- With Transformer Engine, TEDotProductAttention takes THD natively (variable-length flash/fused attention), as
  megatron-core intends.
- With the local layer spec (CPU, or a GPU without TE) megatron-core's DotProductAttention refuses packed input;
  ``PackedDotProductAttention`` is plugged in as the spec's core attention and runs block-diagonal causal
  attention from ``cu_seqlens``: a token sees the earlier tokens of its own sample only.

In both, megatron-core's own attention layer applies RoPE per sample from ``cu_seqlens`` (positions restart at 0
in each), so a packed sample's log-probs equal its unpacked ones up to float rounding
(tests/unit/test_packed_forward.py, tests/parallel at TP2/PP2).
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, device: torch.device) -> PackedSeqParams:
    """THD parameters of one packed sequence (every segment is both query and key: self-attention)."""
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen,
                           max_seqlen_kv=max_seqlen)


class PackedDotProductAttention(DotProductAttention):
    """megatron-core's local core attention, also for THD input ([t, heads, dim], the dummy batch dimension
    squeezed out by the attention layer): block-diagonal causal attention, computed block by block, i.e. the
    unchanged causal attention of each sample on its own slice. Computing the blocks alone costs sum(L_i^2)
    where one masked [t, t] product would cost t^2 (4x more for four equal samples), and needs no [t, t] mask."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r}: only 'thd' is supported")
        bounds = getattr(packed_seq_params, "megarl_bounds", None)
        if bounds is None:  # one host sync per forward, shared by every layer
            bounds = packed_seq_params.megarl_bounds = packed_seq_params.cu_seqlens_q.tolist()
        return torch.cat([super(PackedDotProductAttention, self).forward(
            query[a:b].unsqueeze(1), key[a:b].unsqueeze(1), value[a:b].unsqueeze(1), None, attn_mask_type,
            attention_bias) for a, b in zip(bounds, bounds[1:])])


def with_packed_local_attention(spec):
    """The local layer spec with ``PackedDotProductAttention`` as its core attention."""
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec
