"""Packed sequences through megatron-core, behind one interface: megatron-core's ``PackedSeqParams`` in the THD
format (``cu_seqlens`` of the samples laid back to back, ``megarl/rollout/packing.py``).

- With Transformer Engine, TEDotProductAttention takes THD natively (variable-length flash/fused attention), as
  megatron-core intends.
- With the local layer spec (CPU, or a GPU without TE) megatron-core's DotProductAttention refuses packed input;
  ``PackedDotProductAttention`` (through its subclass ``context_parallel.ContextParallelAttention``, the local
  spec's core attention in ``model.py``) runs block-diagonal causal
  attention from ``cu_seqlens``: a token sees the earlier tokens of its own sample only (samples of near-equal
  length batched together, ``AttentionPlan``).

In both, megatron-core's own attention layer applies RoPE per sample from ``cu_seqlens`` (positions restart at 0
in each; ``install_packed_rope`` makes that one vectorised step), so a packed sample's log-probs equal its
unpacked ones up to float rounding (tests/unit/test_packed_forward.py, tests/parallel at TP2/PP2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, device: torch.device) -> PackedSeqParams:
    """THD parameters of one packed sequence (every segment is both query and key: self-attention)."""
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen,
                           max_seqlen_kv=max_seqlen)


@dataclass(frozen=True)
class AttentionPlan:
    """How one packed sequence's samples are batched for the local core attention.

    Samples (``cu_seqlens`` segments) are sorted by length, longest first, and dealt into buckets; a bucket of k
    samples with longest length Lm runs as one right-padded causal batch [Lm, k], which costs k * Lm^2 where the
    samples alone cost sum(L_i^2). A sample joins the current bucket while that cost stays within ``WASTE`` times
    the bucket's own: near-equal samples share one call (as a padded batch would), a long tail gets calls of its
    own (as packing intends). Exact: under the causal mask a real position never sees the right padding, whose
    outputs are dropped (its rows repeat the sample's last token, so no extra zero tensor is built)."""

    gathers: list[torch.Tensor]  # per bucket [Lm, k]: the packed position each batch slot reads
    inverse: torch.Tensor  # [t]: each packed position's row in the buckets' flattened outputs, concatenated


WASTE = 2.0


def attention_buckets(lengths: list[int], waste: float = WASTE) -> list[list[int]]:
    """Segment indexes per bucket, longest first (see ``AttentionPlan``)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    sq = 0
    for i in order:
        if buckets and (len(buckets[-1]) + 1) * lengths[buckets[-1][0]] ** 2 <= waste * (sq + lengths[i] ** 2):
            buckets[-1].append(i)
            sq += lengths[i] ** 2
        else:
            buckets.append([i])
            sq = lengths[i] ** 2
    return buckets


def attention_plan(bounds: list[int], device: torch.device, waste: float = WASTE) -> AttentionPlan:
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds, bounds[1:])]
    gathers, inverse, offset = [], torch.empty(bounds[-1], dtype=torch.long), 0
    for bucket in attention_buckets(lengths, waste):
        lm, k = lengths[bucket[0]], len(bucket)
        pos = torch.arange(lm)[:, None]
        start = torch.tensor([starts[i] for i in bucket])[None]
        length = torch.tensor([lengths[i] for i in bucket])[None]
        gathers.append((start + torch.minimum(pos, length - 1)).to(device))
        for j, i in enumerate(bucket):  # row pos * k + j of this bucket's [Lm * k] output holds token starts[i] + pos
            inverse[starts[i]:starts[i] + lengths[i]] = offset + torch.arange(lengths[i]) * k + j
        offset += lm * k
    return AttentionPlan(gathers, inverse.to(device))


def _packed_rope(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0,
                 cp_group=None):
    """megatron-core 0.16's unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``), vectorised.

    The stock function reads ``cu_seqlens`` on the host (a device sync) and slices the frequency table once per
    sample in Python, for the queries and again for the keys of every attention layer. On an H200
    (bench/results/nvidia-h200/packing.json) a packed log-prob pass of 32 short samples per micro-batch took 2.1x
    the padded one's time, and this loop was half of the packed pass's extra operator calls (profiled on the CPU;
    the GPU gain is not yet measured). Here each token's position inside its sample is computed on the device (no
    sync; once per packed sequence, kept on its ``cu_seqlens`` tensor), the same table rows are gathered at once and
    megatron-core's own rotation runs once, so the result is the stock one bit for bit
    (tests/unit/test_packed_forward.py). Context parallelism (its per-rank chunk arithmetic) and a table as long as
    the packed row (the stock function's offset mode) go to the stock one."""
    n = t.shape[0]
    if (cp_group is not None and cp_group.size() > 1) or freqs.shape[0] == n:
        return _STOCK_ROPE[0](t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                              multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)
    pos = getattr(cu_seqlens, "megarl_positions", None)  # the queries' and keys' of every layer: one cu tensor
    if pos is None or pos.numel() != n:
        cu = cu_seqlens.to(torch.long)
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=n)
        pos = cu_seqlens.megarl_positions = torch.arange(n, device=t.device) - starts
    return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs[pos], rotary_interleaved=rotary_interleaved,
                                                 multi_latent_attention=multi_latent_attention,
                                                 mscale=mscale).squeeze(1)


_STOCK_ROPE: list = []


def install_packed_rope() -> None:
    """Route megatron-core's unfused THD RoPE through ``_packed_rope`` (once per process; megarl's models run RoPE
    unfused, ``apply_rope_fusion=False`` in ``model.transformer_config``)."""
    if not _STOCK_ROPE:
        _STOCK_ROPE.append(rope_utils._apply_rotary_pos_emb_thd)
        rope_utils._apply_rotary_pos_emb_thd = _packed_rope


class PackedDotProductAttention(DotProductAttention):
    """megatron-core's local core attention, also for THD input ([t, heads, dim], the dummy batch dimension
    squeezed out by the attention layer): block-diagonal causal attention, i.e. the unchanged causal attention of
    each sample on its own slice, with near-equal samples batched (``AttentionPlan``). Costs about sum(L_i^2)
    where one masked [t, t] product would cost t^2 (4x more for four equal samples), and needs no [t, t] mask."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r}: only 'thd' is supported")
        plan = getattr(packed_seq_params, "megarl_plan", None)
        if plan is None:  # one host sync per forward, shared by every layer (and the backward's recompute)
            plan = packed_seq_params.megarl_plan = attention_plan(packed_seq_params.cu_seqlens_q.tolist(),
                                                                   query.device)
        outs = [super(PackedDotProductAttention, self).forward(query[g], key[g], value[g], None, attn_mask_type,
                                                               attention_bias) for g in plan.gathers]
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])[plan.inverse].unsqueeze(1)

