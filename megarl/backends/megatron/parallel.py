"""Megatron's tensor / pipeline / context / data parallel groups over the process group of ``megarl.distributed``,
made from ``megarl.parallel.ParallelDims`` (which owns the degrees and their checks)."""

from __future__ import annotations

import contextlib

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megarl.backends.megatron.cpu_compat import enable_cpu_compat
from megarl.parallel import ParallelDims, RankLayout  # the layout's one owner (re-exported for the backend's callers)


def init_model_parallel(dims: ParallelDims, seed: int = 1234) -> None:
    """Create the TP/CP/EP/PP/DP groups (order tp-cp-ep-dp-pp, Megatron's default) and seed the RNG tracker."""
    enable_cpu_compat()
    dims.check(dist.get_world_size())
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dims.tp,
                                             pipeline_model_parallel_size=dims.pp,
                                             context_parallel_size=dims.cp,
                                             expert_model_parallel_size=dims.ep)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def model_parallel(dims: ParallelDims, seed: int = 1234):
    """Megatron's groups for the body, which gets this rank's ``RankLayout``. Inside groups of the same sizes it
    reuses them and leaves them up."""
    if parallel_state.model_parallel_is_initialized():
        have = rank_layout(dims.sp).dims  # sequence parallelism is a model setting, not a group: any will do
        if have != dims:
            raise ValueError(f"model parallel groups already exist with tp={have.tp} pp={have.pp} cp={have.cp} "
                             f"ep={have.ep}; cannot switch to tp={dims.tp} pp={dims.pp} cp={dims.cp} ep={dims.ep} "
                             f"inside them.")
        yield rank_layout(dims.sp)
        return
    init_model_parallel(dims, seed)
    try:
        yield rank_layout(dims.sp)
    finally:
        destroy_model_parallel()


def rank_layout(sp: bool = False) -> RankLayout:
    """This rank's layout and groups, read from Megatron's parallel state (inside ``model_parallel``); ``sp``:
    whether the run uses sequence parallelism (which needs no groups of its own)."""
    ps = parallel_state
    dims = ParallelDims(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                        ps.get_context_parallel_world_size(), ps.get_expert_model_parallel_world_size(), sp)
    return RankLayout(dims, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                      ps.get_data_parallel_group(), ps.get_model_parallel_group(), ps.get_context_parallel_rank(),
                      ps.get_expert_model_parallel_rank())
