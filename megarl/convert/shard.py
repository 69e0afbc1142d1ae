"""Tensor-parallel layouts between Hugging Face tensors and Megatron shards, as plain tensor ops.

Megatron layouts (per layer; n_q heads, n_kv groups, d head_dim, g = n_q / n_kv):

    linear_qkv   [(n_q + 2 n_kv) d, H]  group-major: for each KV group, its g query heads, then k, then v.
                 Group-major makes the TP split a contiguous chunk along dim 0 (n_kv / tp groups per rank).
    linear_fc1   [2 F, H] = [gate; up].  TP rank r holds [gate_r; up_r], NOT a contiguous chunk of the full
                 tensor: sharding chunks gate and up separately.
    column       split along dim 0 (linear_qkv bias, lm_head ...); row: split along dim 1 (linear_proj, fc2).
    vocab        rows padded to ModelArch.padded_vocab_size with zeros, then split along dim 0.
"""

from __future__ import annotations

import torch

from megarl.convert.arch import ModelArch

KINDS = ("replicated", "column", "row", "vocab", "qkv", "gate_up")


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """HF q/k/v projections (weights [out, H] or biases [out]) -> Megatron's group-major linear_qkv."""
    g, d, n_kv = arch.heads_per_group, arch.head_dim, arch.num_kv_heads
    tail = q.shape[1:]
    qg = q.reshape(n_kv, g * d, *tail)
    kg = k.reshape(n_kv, d, *tail)
    vg = v.reshape(n_kv, d, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of merge_qkv."""
    g, d, n_kv = arch.heads_per_group, arch.head_dim, arch.num_kv_heads
    tail = qkv.shape[1:]
    grouped = qkv.reshape(n_kv, (g + 2) * d, *tail)
    q, k, v = torch.split(grouped, [g * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def to_mcore_full(kind: str, hf: tuple[torch.Tensor, ...], arch: ModelArch) -> torch.Tensor:
    """HF tensor(s) of one rule -> the full (TP=1) Megatron tensor."""
    if kind == "qkv":
        return merge_qkv(*hf, arch)
    if kind == "gate_up":
        return torch.cat(hf, dim=0)
    (t,) = hf
    if kind == "vocab":
        pad = arch.padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t
    return t


def to_hf(kind: str, full: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, ...]:
    """The full Megatron tensor of one rule -> its HF tensor(s). Inverse of to_mcore_full."""
    if kind == "qkv":
        return split_qkv(full, arch)
    if kind == "gate_up":
        return tuple(torch.chunk(full, 2, dim=0))
    if kind == "vocab":
        return (full[: arch.vocab_size],)
    return (full,)


def shard(kind: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s slice of a full Megatron tensor (a view where possible)."""
    if kind == "replicated" or tp == 1:
        return full
    if kind in ("column", "vocab", "qkv"):
        return torch.chunk(full, tp, dim=0)[rank]
    if kind == "row":
        return torch.chunk(full, tp, dim=1)[rank]
    if kind == "gate_up":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, dim=0)[rank], torch.chunk(up, tp, dim=0)[rank]])
    raise ValueError(f"unknown shard kind '{kind}'; known: {', '.join(KINDS)}")


def unshard(kind: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of shard: the full tensor from all TP ranks' slices, in rank order."""
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind in ("column", "vocab", "qkv"):
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "gate_up":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    raise ValueError(f"unknown shard kind '{kind}'; known: {', '.join(KINDS)}")
