"""Context parallelism (``parallel.cp``): each sequence split over the ``cp`` ranks of a context-parallel group.

Layout (megatron-core's, which its RoPE slicing and Transformer Engine's CP attention both assume): a sequence
padded to a multiple of 2 cp is cut into 2 cp equal chunks and rank r holds chunks r and 2cp-1-r, so that under
the causal mask every rank has the same amount of attention work.

- Inputs: ``shard_inputs`` cuts input ids, position ids and the padding mask along the sequence
  (``forward.forward_backward``); packed micro-batches segment by segment (each segment aligned to 2 cp by the
  packer).
- Attention: with Transformer Engine, megatron-core's TE core attention runs CP itself. The local spec's
  ``DotProductAttention`` refuses cp > 1 (megatron-core 0.16 asserts it), so ``ContextParallelAttention``
  exists: it all-gathers K and V over the group (its backward sums each rank's K/V gradient back to the rank that
  holds those tokens), restores the natural token order and runs the stock attention arithmetic with a causal mask
  over true positions (packed: per segment). Every rank then sees the whole sequence's K/V: memory O(S) per rank
  for K/V, O(S / cp) for everything else; TE's ring exchange avoids even that, which is why TE is used where it is
  installed.
- Per-token results: each rank computes log-probs and entropies of the response tokens it holds;
  ``combine_tokens`` sums them over the group into every rank's full [N] vector (backward: the identity, since
  each rank computes the same loss from the same full vector, each rank's gradient reaches exactly its own
  tokens, and Megatron DDP sums the parameter gradients over data x context ranks). The loss and every metric are
  thus computed from whole sequences, as at cp = 1; per-replica results are counted from cp rank 0 only.

The native KV-cache generator runs whole sequences on every rank of the group (``whole_sequences``); vLLM does
the sampling at scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megarl.backends.megatron.packing import PackedDotProductAttention, attention_buckets


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1


def padded_length(s: int, cp: int) -> int:
    """The sequence length padded to a multiple of 2 cp (the load-balanced layout's chunk count)."""
    return -(-s // (2 * cp)) * (2 * cp)


def local_positions(s: int, cp: int, rank: int) -> torch.Tensor:
    """The positions of a padded length-``s`` sequence that context-parallel rank ``rank`` holds, in its order:
    chunks ``rank`` and ``2cp-1-rank``."""
    c = s // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])


def held_positions(s: int, cu: list[int] | None, cp: int, rank: int) -> torch.Tensor:
    """The positions rank ``rank`` holds of a sequence of ``s`` tokens (a multiple of 2 cp): chunks ``rank`` and
    ``2cp-1-rank`` of the whole sequence, or, packed (``cu``: segment bounds, each segment a multiple of 2 cp
    long, ``rollout/packing.py`` with ``align``), of every segment, as megatron-core's THD RoPE expects."""
    if cu is None:
        return local_positions(s, cp, rank)
    return torch.cat([a + local_positions(b - a, cp, rank) for a, b in zip(cu, cu[1:]) if b > a])


def _bounds(packed_seq_params) -> list[int] | None:
    return None if packed_seq_params is None else packed_seq_params.cu_seqlens_q.tolist()


def shard_inputs(ids: torch.Tensor, pos: torch.Tensor, packed_seq_params,
                 padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's part of input ids, position ids and (when given) the padding mask [b, s]: unpacked, padded at
    the end to a multiple of 2 cp (under the causal mask no real token sees the padding, which the mask marks);
    packed, the segments are already aligned."""
    cp, rank, s = cp_size(), parallel_state.get_context_parallel_rank(), ids.shape[1]
    cu = _bounds(packed_seq_params)
    if cu is None:
        pad = padded_length(s, cp) - s
        ids, pos = torch.nn.functional.pad(ids, (0, pad)), torch.nn.functional.pad(pos, (0, pad))
        if padding is not None:
            padding = torch.nn.functional.pad(padding, (0, pad), value=True)
    elif any((b - a) % (2 * cp) for a, b in zip(cu, cu[1:])):
        raise ValueError(f"packed segments must be multiples of 2 cp = {2 * cp} long at context parallelism; build "
                         f"the micro-batches with align=2*cp (rollout/packing.py).")
    idx = held_positions(ids.shape[1], cu, cp, rank).to(ids.device)
    return ids.index_select(1, idx), pos.index_select(1, idx), \
        None if padding is None else padding.index_select(1, idx.to(padding.device))


def _natural_order(s: int, cp: int, device, cu: list[int] | None = None) -> torch.Tensor:
    """Index into the rank-major concatenation of every rank's part that puts the tokens back in sequence order."""
    held = torch.cat([held_positions(s, cu, cp, r) for r in range(cp)])
    return torch.argsort(held).to(device)


class _GatherSequence(torch.autograd.Function):
    """[s/cp, ...] per rank -> [s, ...] in sequence order on every rank; backward: the sum over the ranks of the
    full gradient, this rank's part of it (one reduce-scatter, which gloo and NCCL both have)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, order: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)  # rank-major: rank r's part at r * local
        ctx.group, ctx.order, ctx.local = group, order, x.shape[0]
        return out[order]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = torch.empty_like(grad)
        g[ctx.order] = grad  # back to the rank-major layout
        out = g.new_empty((ctx.local, *g.shape[1:]))
        dist.reduce_scatter_tensor(out, g, group=ctx.group)
        return out, None, None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce sum forward, identity backward (see the module docstring: every rank computes the same loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def pick_local(positions: torch.Tensor, s: int, cu: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``positions`` into flattened [b, s] sequences (packed: b = 1 and segment bounds ``cu``): (the mask of
    those this rank holds, their index into this rank's flattened [b, S/cp] output), where S = ``s`` padded to a
    multiple of 2 cp (packed: ``s`` itself)."""
    cp, rank = cp_size(), parallel_state.get_context_parallel_rank()
    S = padded_length(s, cp) if cu is None else s
    where = torch.full((S,), -1, dtype=torch.long, device=positions.device)
    mine = held_positions(S, cu, cp, rank).to(positions.device)
    where[mine] = torch.arange(len(mine), device=positions.device)
    row, col = positions // s, positions % s
    local = where[col]
    held = local >= 0
    return held, row[held] * len(mine) + local[held]


def combine_tokens(values: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Every rank's values at the tokens it holds (``values`` [n_held], ``held`` [N] bool) -> the full [N] vector
    on every rank of the group."""
    full = values.new_zeros(held.shape).masked_scatter(held, values)
    return _SumOverGroup.apply(full, parallel_state.get_context_parallel_group())


@functools.lru_cache(maxsize=4)
def _unpacked_plan(s: int, cp: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather order, [1, 1, s/cp, s] causal mask by true position, True = not seen) of an unpacked length-``s``
    sequence: made once per micro-batch length and shared by every layer (and the backward's recompute)."""
    q_pos = local_positions(s, cp, rank).to(device)
    return _natural_order(s, cp, device), (torch.arange(s, device=device)[None, :] > q_pos[:, None])[None, None]


@dataclasses.dataclass(frozen=True)
class _PackedPlan:
    """How the local core attention runs a packed micro-batch at cp > 1: the gather order of K/V (natural token
    order), and per bucket of near-equal segments (``packing.attention_buckets``) the local query rows [Lq, k] and
    gathered key rows [Lk, k] each batch slot reads (right-padded with the segment's last row) and the mask
    [k, 1, Lq, Lk] by true position (True = not seen; keys past a segment's end lie after all its queries, so the
    causal rule masks them too); ``inverse``: each local token's row in the buckets' flattened outputs."""

    order: torch.Tensor
    buckets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    inverse: torch.Tensor


def _packed_plan(cu: list[int], cp: int, rank: int, device: torch.device) -> _PackedPlan:
    segments = [(a, b) for a, b in zip(cu, cu[1:]) if b > a]
    buckets, inverse, offset = [], torch.empty(cu[-1] // cp, dtype=torch.long), 0
    for bucket in attention_buckets([b - a for a, b in segments]):
        lk = max(segments[i][1] - segments[i][0] for i in bucket)
        lq, k = lk // cp, len(bucket)
        qg, kg, q_pos = torch.empty(lq, k, dtype=torch.long), torch.empty(lk, k, dtype=torch.long), []
        for j, i in enumerate(bucket):
            a, b = segments[i]
            n = (b - a) // cp  # this rank's tokens of the segment, from local row a // cp on
            qg[:, j] = a // cp + torch.arange(lq).clamp(max=n - 1)
            kg[:, j] = a + torch.arange(lk).clamp(max=b - a - 1)
            held = local_positions(b - a, cp, rank)
            q_pos.append(torch.cat([held, held[-1:].expand(lq - n)]))
            inverse[a // cp: a // cp + n] = offset + torch.arange(n) * k + j
        masked = torch.arange(lk)[None, None, :] > torch.stack(q_pos)[:, :, None]  # [k, Lq, Lk]
        buckets.append((qg.to(device), kg.to(device), masked[:, None].to(device)))
        offset += lq * k
    return _PackedPlan(_natural_order(cu[-1], cp, device, cu), buckets, inverse.to(device))


class ContextParallelAttention(PackedDotProductAttention):
    """The local spec's core attention at cp > 1 (see the module docstring for why it exists): K/V gathered over
    the context-parallel group, the stock arithmetic with a causal mask by true position, packed input segment by
    segment. At cp = 1 (and under ``whole_sequences``) it is ``PackedDotProductAttention``."""

    def __init__(self, config, *args, **kwargs):
        # the parent refuses context_parallel_size > 1 at construction; its arithmetic needs no CP knowledge
        super().__init__(dataclasses.replace(config, context_parallel_size=1), *args, **kwargs)
        self.config = config

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        cp = self.config.context_parallel_size
        if cp == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        group, rank = parallel_state.get_context_parallel_group(), parallel_state.get_context_parallel_rank()
        stock = super(PackedDotProductAttention, self).forward  # megatron-core's DotProductAttention
        if packed_seq_params is None:
            order, masked = _unpacked_plan(key.shape[0] * cp, cp, rank, query.device)
            key, value = _GatherSequence.apply(key, group, order), _GatherSequence.apply(value, group, order)
            return stock(query, key, value, masked, attn_mask_type, attention_bias)
        # packed ([t/cp, heads, dim]): each segment's local queries against that segment's gathered keys, segments
        # of near-equal length batched into one call (as on one rank, ``packing.AttentionPlan``)
        plan = getattr(packed_seq_params, "megarl_cp_plan", None)
        if plan is None:  # one host sync per forward, shared by every layer
            cu = _bounds(packed_seq_params)
            plan = packed_seq_params.megarl_cp_plan = _packed_plan(cu, cp, rank, query.device)
        key, value = _GatherSequence.apply(key, group, plan.order), _GatherSequence.apply(value, group, plan.order)
        outs = [stock(query[qg], key[kg], value[kg], masked, attn_mask_type, attention_bias)
                for qg, kg, masked in plan.buckets]
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])[plan.inverse].unsqueeze(1)


@contextlib.contextmanager
def whole_sequences(gpt: torch.nn.Module):
    """Inside, the GPTModel ``gpt`` runs whole, unsharded sequences on every context-parallel rank (the native KV-cache
    generator: megatron-core's inference path has no CP). RoPE stops slicing per rank; attention is plain."""
    config, rope = gpt.config, gpt.rotary_pos_emb  # megarl's models all use RoPE (model.py)
    cp, group = config.context_parallel_size, rope.cp_group
    if cp == 1:
        yield
        return
    if any(not isinstance(m, ContextParallelAttention) for m in gpt.modules()
           if type(m).__name__.endswith("DotProductAttention")):  # TE's keeps its CP group whatever the config says
        raise NotImplementedError(f"the native generator at parallel.cp={cp} runs the local layer spec only; with "
                                  f"Transformer Engine sample with vLLM (rollout.backend=vllm) or set "
                                  f"model.layer_spec=local.")
    type(rope).forward.cache_clear()  # RoPE tables are cached by length only: drop the per-rank slices
    config.context_parallel_size, rope.cp_group = 1, None  # one TransformerConfig is shared by the model's modules
    try:
        yield
    finally:
        type(rope).forward.cache_clear()
        config.context_parallel_size, rope.cp_group = cp, group
