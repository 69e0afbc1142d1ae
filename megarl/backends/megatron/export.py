"""Streaming export of a TP/PP Megatron model as HF-named full tensors, in bounded-size buckets.

Used by ``mcore-to-hf`` (written to disk) and by weight sync into inference engines. Every rank receives every
tensor: each pipeline stage gathers its tensors over TP, then broadcasts them to the other stages. One bucket
(plus the one tensor being gathered) is alive at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megarl.backends.megatron.weights import export_stage_hf
from megarl.convert.arch import ModelArch

Bucket = list[tuple[str, torch.Tensor]]


def _stage_tensors(model: torch.nn.Module, arch: ModelArch, stage: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Stage ``stage``'s tensors on every rank of this pipeline: local ones directly, others by broadcast."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    mine = parallel_state.get_pipeline_model_parallel_rank() == stage
    if pp == 1:
        yield from export_stage_hf(model, arch)
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(group, stage)
    stream = export_stage_hf(model, arch) if mine else None
    while True:
        item = next(stream, None) if mine else None
        header = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
        dist.broadcast_object_list(header, src=src, group=group)
        if header[0] is None:
            return
        name, shape, dtype = header[0]
        tensor = item[1].contiguous() if mine else torch.empty(shape, dtype=dtype)
        if dist.get_backend(group) == "nccl":
            tensor = tensor.cuda()
        dist.broadcast(tensor, src=src, group=group)
        yield name, tensor


def export_hf_weights(model: torch.nn.Module, arch: ModelArch, bucket_bytes: int = 256 << 20) -> Iterator[Bucket]:
    """Yield buckets of (HF name, full tensor) covering the whole model, on every rank, stage by stage."""
    bucket: Bucket = []
    size = 0
    for stage in range(parallel_state.get_pipeline_model_parallel_world_size()):
        for name, tensor in _stage_tensors(model, arch, stage):
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
    if bucket:
        yield bucket
