"""Process-group bootstrap: torchrun (single or multi node, env:// rendezvous) or a plain single process.

NCCL when CUDA is present, gloo otherwise. Megatron's TP/PP/DP groups are made on top of this by
``megarl.backends.megatron.parallel``. ``distributed()`` tears everything down on normal exit and on error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...), or make a group of one."""
    torchrun = "RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if torchrun else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) if torchrun else 1
    backend = default_backend()
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        else:  # share the cores this process may use (taskset, cpusets) between the local ranks, not oversubscribe
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // local_world))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if torchrun:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:  # plain `python` / `megarl ...`: a world of one; no environment variables set (children inherit them)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dist.get_backend())


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(timeout_minutes: int = 30):
    """``with distributed() as info:`` -- the process group for the body, destroyed however the body ends.

    Inside an existing process group (a library call within a running job) it joins that group and leaves it up.
    """
    started = not dist.is_initialized()
    info = init_distributed(timeout_minutes)
    try:
        yield info
    finally:
        if started:
            shutdown_distributed()


def comm_device(group=None) -> torch.device:
    """Where a tensor must live to go through a collective of ``group``: NCCL takes CUDA tensors only, gloo CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: dict[str, float], group=None, op=None) -> dict[str, float]:
    """Sum (or ``op``, e.g. ``dist.ReduceOp.MAX``) a dict of floats over a process group (loss counts, metrics)."""
    if not values or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, t.tolist()))
