"""``rollout.placement=ray``: a fleet of vLLM engines as Ray actors, sized apart from the trainer, on an existing
Ray cluster (``rollout.ray_address`` or ``RAY_ADDRESS``) or on a local one the run starts and stops itself.

The trainer stays a torchrun/Megatron SPMD job; only its global rank 0 is a Ray driver. Per generate call:

    gather      every rank's prompts (and per-prompt seeds) reach rank 0, one list per data-parallel replica
    dispatch    rank 0 deals all prompts over the engines in contiguous chunks; each engine samples with the
                prompt's own seed, so a sample depends on (weights, prompt, seed), not on the engine or batch
    scatter     each replica gets its completions back

A sync (whenever ``policy.version`` moved) streams the policy's HF-named tensors (``Policy.hf_weights``; every
trainer rank takes part in that collective) from rank 0 to every engine over a weight channel of their own
(``channel.py``: gloo on CPU, NCCL on GPUs), into vLLM's in-place reload, then checks it as the colocated sync
does: the names each engine received are its checkpoint names, and a fixed probe's log-probs under each engine
match the policy's within ``rollout.vllm_probe_tol``. An engine actor that dies is replaced, the channel rebuilt,
the weights re-sent and the call retried; ``rollout/engine_restarts`` counts it. Ray kills the actors when the
driver exits or dies (owner fate-sharing); a local cluster this run started is shut down in ``close``, and a
watcher (``reaper.py``) kills what of it would outlive a killed trainer.

An engine is ``rollout.tp`` worker actors in a placement group on one node (``engine.py``); every worker joins
the weight channel and gets every call, and worker 0 answers for its engine.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megarl.backends.protocols import Completion, Policy, SamplingParams, Ticket
from megarl.backends.ray.channel import WeightChannel
from megarl.backends.ray.engine import Engine, EngineWorker, place
from megarl.backends.ray.partial import Segmented
from megarl.backends.vllm.colocated import default_probe_tol
from megarl.convert.arch import ModelArch

MAX_RESTARTS_PER_CALL = 3


def reachable(address: str, timeout_s: float = 10.0) -> None:
    """A host:port address must answer before ``ray.init`` is given it: Ray itself keeps retrying a dead address
    for many minutes. (Other forms, e.g. "auto" or "ray://...", are left to Ray.)"""
    import socket

    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"rollout.ray_address={address}: no Ray cluster answers there ({e.strerror or e}); start "
                         f"one (ray start --head) or fix rollout.ray_address / RAY_ADDRESS.") from None


class RayFleet:
    """The ``Generator`` of ``rollout.placement=ray``. Every trainer rank builds it and calls every method."""

    def __init__(self, policy: Policy, arch: ModelArch, model_dir: Path, *, engines: int, tp: int, address: str | None,
                 dtype: str, max_model_len: int, kv_cache_mb: int, gpu_memory_utilization: float,
                 probe_tol: float | None, seed: int, dp_rank: int, probe: list[int], partial_tokens: int = 0):
        self.policy, self.arch, self.dp_rank, self.probe = policy, arch, dp_rank, probe
        # partial rollouts (partial.py): calls sampled in segments of this many tokens (0: whole calls); syncs are
        # counted (tag) and a push pending holds the segment threads (gate cleared) until it has run
        self.partial_tokens, self.tag, self.gate = partial_tokens, 0, threading.Event()
        self.gate.set()
        self.probe_tol = probe_tol if probe_tol is not None else default_probe_tol(dtype)
        self.main = dist.get_rank() == 0
        self.synced_version: int | None = None
        self.restarts = 0
        self.engines: list[Engine] = []
        self.own_cluster, self.groups = False, []
        failure = None
        if self.main:
            try:
                self._launch(model_dir, engines, tp, address, (dtype, max_model_len, kv_cache_mb,
                                                               gpu_memory_utilization, seed))
            except Exception as e:  # noqa: BLE001 -- re-raised below, after the other ranks heard of it
                failure = e
                with contextlib.suppress(Exception):
                    self.close()
        # every rank stops with rank 0's error (a cluster too small: a ValueError naming it), none waits forever
        box = [None if failure is None else (isinstance(failure, ValueError), str(failure))]
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        if box[0] is not None:
            raise (ValueError if box[0][0] else RuntimeError)(box[0][1])

    def _launch(self, model_dir: Path, engines: int, tp: int, address: str | None, engine_args: tuple) -> None:
        """Rank 0: connect to (or start) the cluster, place and start the engines, open the weight channel."""
        import ray

        address = address or os.environ.get("RAY_ADDRESS")
        self.own_cluster = not address
        gpu = torch.cuda.is_available()
        kind, need = ("GPU", engines * tp) if gpu else ("CPU", engines * tp)
        if self.own_cluster:  # a local cluster with exactly the engines' resources; stopped in close()
            import subprocess
            import sys

            self.reaper = subprocess.Popen([sys.executable, "-m", "megarl.backends.ray.reaper", str(os.getpid())],
                                           stdin=subprocess.DEVNULL)
            # address="local": always a new cluster (with no address Ray would join the last one started here)
            ray.init(address="local", **({"num_gpus": need, "num_cpus": need} if gpu else {"num_cpus": need}),
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            reachable(address)
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except ConnectionError as e:  # e.g. a cluster with token authentication, and none given here
                raise ValueError(f"rollout.ray_address={address}: Ray could not connect ({str(e).splitlines()[0]}); "
                                 f"if the cluster uses token authentication, set RAY_AUTH_MODE=token and "
                                 f"RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) for the trainer.") from None
        have = ray.cluster_resources()
        if have.get(kind, 0) < need:
            raise ValueError(f"rollout.placement=ray: {engines} engines of tensor parallel size {tp} need {need} "
                             f"{kind}, but the Ray cluster at {address or 'local'} has {have.get(kind, 0):g}; lower "
                             f"rollout.engines / rollout.tp or grow the cluster.")
        remote = ray.remote(**({"num_gpus": 1} if gpu else {"num_cpus": 1}))(EngineWorker)
        args = (str(model_dir), *engine_args)
        for i in range(engines):  # kept across restarts
            self.groups.append(place(tp, gpu, i))
        self.make = lambda i: Engine(remote, args, tp, self.groups[i])
        self.engines = [self.make(i) for i in range(engines)]
        self._start(self.engines)
        self.expected = ray.get(self.engines[0].call("names"))[0]
        self.backend = "nccl" if gpu else "gloo"
        self._connect()

    @staticmethod
    def _start(engines: list[Engine]) -> None:
        import ray

        ray.get([f for e in engines for f in e.start()])

    def _connect(self) -> None:
        """A fresh weight channel between rank 0 and every engine (after a restart the old one is broken)."""
        import ray
        from ray.util import get_node_ip_address

        from megarl.distributed import free_port

        workers = [w for e in self.engines for w in e.workers]
        host, port, size = get_node_ip_address(), free_port(), len(workers) + 1
        joined = [w.join.remote(host, port, i + 1, size, self.backend) for i, w in enumerate(workers)]
        self.channel = WeightChannel(host, port, 0, size, backend=self.backend)
        ray.get(joined)

    @property
    def stale(self) -> bool:
        return self.synced_version != self.policy.version

    def sync(self) -> dict[str, float]:
        """Send the policy's weights to every engine and verify them (module docstring). Collective; retried with
        fresh engines when one dies during it."""
        self.gate.clear()
        try:
            for _ in range(MAX_RESTARTS_PER_CALL + 1):
                metrics = self._sync_once()
                if metrics is not None:
                    return metrics
                self.restarts += 1
        finally:
            self.gate.set()
        raise RuntimeError(f"the Ray fleet lost an engine {MAX_RESTARTS_PER_CALL + 1} times in one sync; giving up.")

    def _sync_once(self) -> dict[str, float] | None:
        t0 = time.perf_counter()
        status, nbytes = None, 0  # None: sent; "retry": an engine died; otherwise an error message
        stream = self.policy.hf_weights()  # a collective on every trainer rank: each must run it to the end
        if self.main:
            import ray

            received = [e.call("receive", self.tag + 1) for e in self.engines]
            try:
                nbytes = self.channel.send(stream)
                results = [ray.get(futures)[0] for futures in received]
            except Exception as e:  # noqa: BLE001 -- an engine (or its end of the channel) died mid-sync
                for _ in stream:  # finish the export's collectives with the other trainer ranks
                    pass
                print(f"rollout fleet: an engine failed during a weight sync ({type(e).__name__}); restarting "
                      f"all {len(self.engines)} engines", flush=True)
                self._restart_all()
                status = "retry"
            else:
                for i, (_, names) in enumerate(results):
                    got = {n for n in names if n != "lm_head.weight" or not self.arch.tie_embeddings}
                    if got != self.expected:
                        status = (f"weight sync to engine {i}: names sent differ from its checkpoint names; missing "
                                  f"{sorted(self.expected - got)[:8]}, unknown {sorted(got - self.expected)[:8]}")
        else:
            for _ in stream:
                pass
        mine = self.policy.probe_logprobs(self.probe)
        diff = 0.0
        if self.main and status is None:
            import ray

            calls = [e.call("prompt_logprobs", self.probe) for e in self.engines]
            theirs = [ray.get(futures)[0] for futures in calls]
            diff = max(abs(a - b) for lps in theirs for a, b in zip(mine, lps))
        box = [(status, diff, nbytes)]
        dist.broadcast_object_list(box, src=0)
        status, diff, nbytes = box[0]
        if status == "retry":
            return None
        if status is None and not diff <= self.probe_tol:
            status = (f"weight sync to the Ray fleet failed its check: max |vLLM - Megatron| log-prob on a fixed "
                      f"{len(self.probe)}-token probe = {diff:.3g} > rollout.vllm_probe_tol = {self.probe_tol:g}")
        if status:
            raise RuntimeError(status)
        self.synced_version, self.tag = self.policy.version, self.tag + 1
        return {"sync/seconds": time.perf_counter() - t0, "sync/bytes": float(nbytes), "sync/probe_diff_max": diff,
                "rollout/engine_restarts": float(self.restarts)}

    def _restart_all(self) -> None:
        """Rank 0: every engine replaced and a new channel (a survivor may be stuck in the broken one)."""
        self.channel = None
        for e in self.engines:
            e.kill()
        self.engines = [self.make(i) for i in range(len(self.engines))]
        self._start(self.engines)
        self._connect()

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        return self.collect(self.submit(prompts, n, sampling, seeds))

    def submit(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
               seeds: list[int] | None = None, refresh: bool = True) -> Ticket:
        """Sync if stale (unless ``refresh`` is False), then hand every replica's prompts to the engines and return
        at once: the engines sample while the trainer goes on (``rollout.max_staleness``); ``collect`` waits."""
        if seeds is None:  # as the colocated engine numbers them: by position in this replica's list
            seeds = sampling.prompt_seeds(len(prompts))
        if refresh and self.stale:
            self.sync()
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.dp_rank, prompts, seeds))
        return Ticket((parts, n, sampling, self._send(parts, n, sampling) if self.main else None))

    def collect(self, ticket: Ticket) -> list[list[Completion]]:
        """The submitted call's completions for this replica. An engine that died meanwhile is replaced and the
        call sampled again with the policy's weights of now (``ticket.regenerated``)."""
        parts, n, sampling, sent = ticket.work
        for _ in range(MAX_RESTARTS_PER_CALL + 1):
            box = [self._receive(*sent) if self.main else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None:
                return box[0][self.dp_rank]
            self.synced_version = None  # an engine was replaced: every rank re-syncs, then retries
            self.restarts += 1
            ticket.regenerated = True
            self.sync()
            sent = self._send(parts, n, sampling) if self.main else None
        raise RuntimeError(f"the Ray fleet lost an engine {MAX_RESTARTS_PER_CALL + 1} times in one call; giving up.")

    def _send(self, parts: list, n: int, sampling: SamplingParams) -> tuple:
        """Rank 0: every replica's prompts dealt over the engines; (replicas, chunks, futures) for ``_receive``."""
        replicas: dict[int, tuple] = {}
        for dp, prompts, seeds in parts:
            replicas.setdefault(dp, (prompts, seeds))  # the ranks of one replica send the same list
        work = [(dp, i, p, s) for dp, (prompts, seeds) in sorted(replicas.items())
                for i, (p, s) in enumerate(zip(prompts, seeds))]
        k = len(self.engines)
        chunks = [work[j * len(work) // k:(j + 1) * len(work) // k] for j in range(k)]
        if self.partial_tokens:
            calls = [Segmented(e, [w[2] for w in c], [w[3] for w in c], n, sampling, self.partial_tokens, self.gate)
                     if c else None for e, c in zip(self.engines, chunks)]
        else:
            calls = [e.call("generate", [w[2] for w in c], n, sampling, [w[3] for w in c]) if c else None
                     for e, c in zip(self.engines, chunks)]
        return replicas, chunks, calls

    def _receive(self, replicas: dict, chunks: list, calls: list) -> dict | None:
        """Rank 0: the completions per replica; None after replacing engines that died."""
        import ray
        from ray.exceptions import RayActorError

        outs, dead = [], []
        for j, call in enumerate(calls):
            try:
                outs.append([] if call is None else call.get() if isinstance(call, Segmented) else ray.get(call)[0])
            except RayActorError:
                dead.append(j)
        if dead:
            print(f"rollout fleet: engine(s) {dead} died during generation; replaced", flush=True)
            for j in dead:  # the whole engine: its other workers are stuck in the dead one's collectives
                self.engines[j].kill()
                self.engines[j] = self.make(j)
            self._start([self.engines[j] for j in dead])
            self._connect()
            return None
        result = {dp: [None] * len(prompts) for dp, (prompts, _) in replicas.items()}
        for c, out in zip(chunks, outs):
            for (dp, i, _, _), completions in zip(c, out):
                result[dp][i] = completions
        return result

    def sleep(self) -> None:
        """The engines run on their own devices: nothing to free for the trainer."""

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        """Rank 0: the engines and their placement groups gone; a local cluster this run started shut down (also
        after a failed start)."""
        if not self.main:
            return
        import ray
        from ray.util.placement_group import remove_placement_group

        for e in self.engines:
            e.kill(graceful=True)
        for g in self.groups:
            remove_placement_group(g)
        self.engines, self.groups = [], []
        if self.own_cluster:
            if ray.is_initialized():
                ray.shutdown()
            if getattr(self, "reaper", None) is not None:
                self.reaper.kill()
                self.reaper = None
