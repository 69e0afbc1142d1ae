"""Tensor-parallel reductions for vocab-parallel kernels, with Megatron's gradient convention.

The loss downstream is replicated on every TP rank, so a sum over ranks has an identity backward (each rank's
shard receives the same upstream gradient), as Megatron's ``reduce_from_tensor_model_parallel_region`` does.
``torch.distributed.nn.functional.all_reduce`` would all-reduce the gradient too and scale it by the TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _SumIdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def tp_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def tp_rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over the TP group (identity backward); a no-op without a group."""
    return _SumIdentityBackward.apply(x, group) if tp_size(group) > 1 else x


def all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    """Max over the TP group, no gradient (used only as a softmax shift)."""
    x = x.detach().clone()
    if tp_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types and fp32, fp64 kept (oracle tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
