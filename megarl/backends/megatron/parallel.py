"""Megatron's tensor / pipeline / data parallel groups over the process group of ``megarl.distributed``."""

from __future__ import annotations

import contextlib
import dataclasses

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megarl.backends.megatron.cpu_compat import enable_cpu_compat


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """The parallel degrees of a run. dp is derived: world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


def init_model_parallel(dims: ParallelDims, seed: int = 1234) -> None:
    """Create the TP/PP/DP groups (order tp-cp-ep-dp-pp, Megatron's default) and seed the RNG tracker."""
    enable_cpu_compat()
    world = dist.get_world_size()
    if world % (dims.tp * dims.pp):
        raise ValueError(f"world size {world} is not divisible by parallel.tp x parallel.pp = {dims.tp * dims.pp}; "
                         f"launch a multiple of {dims.tp * dims.pp} processes or change parallel.tp/parallel.pp.")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dims.tp,
                                             pipeline_model_parallel_size=dims.pp)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def model_parallel(dims: ParallelDims, seed: int = 1234):
    """Megatron's groups for the body. Inside groups of the same sizes it reuses them and leaves them up."""
    if parallel_state.model_parallel_is_initialized():
        have = ParallelDims(parallel_state.get_tensor_model_parallel_world_size(),
                            parallel_state.get_pipeline_model_parallel_world_size())
        if have != dims:
            raise ValueError(f"model parallel groups already exist with tp={have.tp} pp={have.pp}; cannot switch "
                             f"to tp={dims.tp} pp={dims.pp} inside them.")
        yield dims
        return
    init_model_parallel(dims, seed)
    try:
        yield dims
    finally:
        destroy_model_parallel()


def dp_info() -> tuple[int, int, object]:
    """(data-parallel rank, size, group) of this rank."""
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


def model_parallel_group():
    """The TP x PP group of this rank's data-parallel replica."""
    return parallel_state.get_model_parallel_group()
