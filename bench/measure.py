"""Measurement helpers the training benches share: timed policy updates and each rank's peak memory."""

from __future__ import annotations

import time


def timed_updates(policy, ro, groups, loss, token_budget: int, steps: int) -> tuple[list[float], dict]:
    """``steps`` timed ``train_step`` calls after one warm-up (every rank in step): (seconds each, last metrics)."""
    import torch
    import torch.distributed as dist

    times, metrics = [], {}
    for step in range(steps + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        metrics = policy.train_step(ro, groups, loss, token_budget, 1.0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return times, metrics


def peak_memory_ranks() -> list[int]:
    """Every rank's peak memory in bytes: CUDA max_memory_allocated, or the process's peak RSS on CPU."""
    import resource

    import torch
    import torch.distributed as dist

    mine = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, mine)
    return peaks


def print_result(row: dict) -> None:
    """The worker's row as the ``RESULT <json>`` line ``results_io.run_one`` reads, printed by global rank 0."""
    import json
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(row), flush=True)
