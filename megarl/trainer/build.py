"""``build(cfg)``: everything the RL loop needs, made from the run configuration on every rank.

Called inside ``megarl.distributed.distributed()`` and Megatron's ``model_parallel`` groups. The reference policy
follows the algorithm (``megarl.algo.resolve``); the generator is the native Megatron one, which runs the policy's own
modules, so its weights are the trainer's without a copy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megarl.backends.megatron.generator import MegatronGenerator
from megarl.backends.megatron.model import DTYPES, build_model
from megarl.backends.megatron.policy import MegatronPolicy, MegatronReference
from megarl.backends.megatron.weights import load_hf_weights
from megarl.backends.protocols import Generator, Policy, Reference, SamplingParams
from megarl.config import RunConfig
from megarl.convert.arch import ModelArch, read_arch_dir, stop_ids
from megarl.convert.bundled import resolve_model_spec
from megarl.convert.hf_io import HFReader
from megarl.data.arith_dataset import write_arith_dataset
from megarl.data.kk_dataset import write_kk_dataset
from megarl.data.source import PromptSource
from megarl.parallel import RankLayout
from megarl.algo import Algorithm, resolve
from megarl.rewards import compute_score
from megarl.rewards.executor import RewardExecutor, load_score_fn
from megarl.trainer.vstar import estimate_files, has_v_star


@dataclasses.dataclass
class Components:
    cfg: RunConfig
    arch: ModelArch
    model_dir: Path
    tokenizer: Any
    policy: Policy  # MegatronPolicy (megarl/backends/megatron/policy.py)
    reference: Reference | None
    ref_kind: str
    generator: Generator  # the native Megatron generator, or colocated vLLM (megarl/backends/vllm/colocated.py)
    source: PromptSource
    executor: RewardExecutor
    algo: Algorithm  # the loss (algo.loss.loss), its advantage estimator and reference kind
    sampling: SamplingParams
    layout: RankLayout  # this rank's data-parallel place and the groups counts and metrics reduce over


def load_weights_into(model: torch.nn.Module, arch: ModelArch, hf_dir: Path) -> None:
    reader = HFReader(hf_dir)
    try:
        load_hf_weights(model, arch, reader.get)
    finally:
        reader.close()


def once_per_node_then_all(fn):
    """Run ``fn`` on local rank 0 first (it writes caches/files), then on every rank (they read them)."""
    import os

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        fn()
    dist.barrier()
    return fn()


def train_files(cfg: RunConfig) -> list[str]:
    if cfg.data.train_files:
        return list(cfg.data.train_files)
    out = Path(cfg.run.dir) / "data"

    def make():
        if not (out / "train.parquet").is_file():
            n_test = max(1, cfg.data.generate_size // 8)
            if cfg.data.generate == "arithmetic":
                write_arith_dataset(out, cfg.data.generate_size, n_test, cfg.data.arith_max_operand,
                                    seed=cfg.run.seed)
            else:
                write_kk_dataset(out, cfg.data.generate_size, n_test, list(cfg.data.kk_people), seed=cfg.run.seed,
                                 template=cfg.data.template)
        return [str(out / "train.parquet")]

    return once_per_node_then_all(make)


def initial_model(cfg: RunConfig):
    """(model_dir, arch, tokenizer, model): the run's starting model (model.hf_dir) as this rank's Megatron stage."""
    from transformers import AutoTokenizer

    model_dir = once_per_node_then_all(lambda: resolve_model_spec(cfg.model.hf_dir, cfg.run.dir, cfg.run.seed))
    arch = read_arch_dir(model_dir)
    if arch.is_moe and cfg.parallel.tp > 1 and not cfg.parallel.sp:
        raise ValueError(f"parallel.tp={cfg.parallel.tp} with a mixture-of-experts model: megatron-core trains MoE "
                         f"layers at tp > 1 only with sequence parallelism; set parallel.sp=true (or split the "
                         f"model with parallel.ep and parallel.pp at parallel.tp=1).")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(arch, dtype=DTYPES[cfg.model.dtype], layer_spec=_layer_spec(cfg), init_weights=False,
                        recompute=cfg.model.recompute, moe=cfg.moe, sequence_parallel=cfg.parallel.sp)
    load_weights_into(model, arch, model_dir)
    return Path(model_dir), arch, tokenizer, model


def make_policy(cfg: RunConfig, model, arch: ModelArch, model_dir: Path, total_updates: int) -> MegatronPolicy:
    """The trainable policy around ``model``: optim.* over ``total_updates`` optimizer steps, kernels.impl,
    train.packing."""
    o = cfg.optim
    optim = dict(name=o.name, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2),
                 grad_clip=o.grad_clip, distributed=o.distributed, warmup_steps=o.warmup_steps,
                 schedule=o.schedule)
    return MegatronPolicy(model, arch, optim, total_updates, kernel_impl=cfg.kernels.impl, source_dir=model_dir,
                          packing=cfg.train.packing)


def _layer_spec(cfg: RunConfig) -> str | None:
    return None if cfg.model.layer_spec == "auto" else cfg.model.layer_spec


def rollout_sampling(cfg: RunConfig, tokenizer, arch: ModelArch) -> SamplingParams:
    return SamplingParams(max_tokens=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature,
                          top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop_ids=stop_ids(tokenizer, arch),
                          seed=cfg.run.seed)


def reward_executor(cfg: RunConfig) -> RewardExecutor:
    score_fn = load_score_fn(cfg.reward.custom_fn) if cfg.reward.custom_fn else compute_score
    return RewardExecutor(cfg.reward.num_workers, cfg.reward.timeout_s, score_fn=score_fn)


def vstar_files(cfg: RunConfig, files: list[str], generator, tokenizer, arch: ModelArch, executor: RewardExecutor,
                layout: RankLayout, out_dir: str | Path | None = None, always: bool = False,
                **options) -> list[str]:
    """A*-PO stage 1 into ``out_dir`` (default run.dir/vstar; finished files are reused) for ``files``; data that
    already has V* is returned as it is unless ``always``. ``options`` go to ``vstar.estimate_file``."""
    if not always and has_v_star(files):
        return files
    return estimate_files(files, Path(out_dir or Path(cfg.run.dir) / "vstar"), generator=generator,
                          tokenizer=tokenizer, executor=executor, sampling=rollout_sampling(cfg, tokenizer, arch),
                          layout=layout,
                          n=cfg.algo.vstar_samples, beta1=cfg.algo.vstar_beta1,
                          max_prompt_tokens=cfg.data.max_prompt_tokens,
                          overlong_buffer=cfg.rollout.overlong_buffer, overlong_factor=cfg.rollout.overlong_factor,
                          **{"progress": cfg.metrics.progress, **options})


def rollout_backend(cfg: RunConfig, arch: ModelArch) -> tuple[str, str]:
    """('vllm' | 'native', why): rollout.backend resolved for this machine and model."""
    from megarl.backends.vllm.engine import unsupported_reason

    if cfg.rollout.backend == "native":
        return "native", "rollout.backend=native"
    why_not = unsupported_reason(arch.head_dim)
    if cfg.rollout.backend == "vllm" and why_not:
        raise ValueError(f"rollout.backend=vllm, but {why_not}; use rollout.backend=native (or auto).")
    return ("native", f"rollout.backend=auto, and {why_not}") if why_not else ("vllm", f"rollout.backend="
                                                                               f"{cfg.rollout.backend}")


def make_generator(cfg: RunConfig, policy: MegatronPolicy, arch: ModelArch, model_dir: Path, layout: RankLayout):
    kind, why = rollout_backend(cfg, arch)
    fleet = cfg.rollout.placement == "ray"
    if fleet and kind != "vllm":
        raise ValueError(f"rollout.placement=ray runs vLLM engines, but the rollouts would use the native generator "
                         f"({why}); use a model vLLM can serve, or rollout.placement=colocated.")
    if dist.get_rank() == 0:
        where = f"a Ray fleet of {cfg.rollout.engines} x TP{cfg.rollout.tp}" if fleet else "colocated"
        print(f"rollouts: {f'vLLM ({where})' if kind == 'vllm' else 'native Megatron generator'} ({why})",
              flush=True)
    if kind == "native":
        return MegatronGenerator(policy.module, arch)
    eval_tokens = cfg.eval.max_tokens or cfg.rollout.max_tokens
    max_len = min(arch.max_position_embeddings, cfg.data.max_prompt_tokens + max(cfg.rollout.max_tokens, eval_tokens))
    from megarl.backends.vllm.colocated import PROBE_LEN, ColocatedVLLM, probe_ids

    if fleet:
        from megarl.backends.ray.fleet import RayFleet

        return RayFleet(policy, arch, model_dir, engines=cfg.rollout.engines, tp=cfg.rollout.tp,
                        address=cfg.rollout.ray_address,
                        dtype=cfg.model.dtype, max_model_len=max_len, kv_cache_mb=cfg.rollout.vllm_kv_cache_mb,
                        gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                        probe_tol=cfg.rollout.vllm_probe_tol, seed=cfg.run.seed, dp_rank=layout.dp_rank,
                        probe=probe_ids(arch.vocab_size, min(PROBE_LEN, max_len - 1)),
                        partial_tokens=cfg.rollout.partial_tokens if cfg.rollout.partial else 0)

    return ColocatedVLLM(policy, arch, model_dir, tp=cfg.parallel.tp, dtype=cfg.model.dtype, max_model_len=max_len,
                         kv_cache_mb=cfg.rollout.vllm_kv_cache_mb,
                         gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                         probe_tol=cfg.rollout.vllm_probe_tol, seed=cfg.run.seed, group=layout.model_group)


def build(cfg: RunConfig, layout: RankLayout) -> Components:
    """Every component of the run of ``cfg`` on this rank (inside the process groups ``layout`` describes)."""
    model_dir, arch, tokenizer, model = initial_model(cfg)
    policy = make_policy(cfg, model, arch, model_dir, cfg.train.steps * cfg.train.minibatches_per_step)
    algo = resolve(cfg)
    if dist.get_rank() == 0:
        print("\n".join([layout.describe(), algo.describe(), *algo.notes]), flush=True)
    kind, reference = algo.reference, None
    if kind == "fixed":
        ref_model = build_model(arch, dtype=DTYPES[cfg.model.dtype], layer_spec=_layer_spec(cfg), init_weights=False,
                                moe=cfg.moe, sequence_parallel=cfg.parallel.sp)
        load_weights_into(ref_model, arch, model_dir)
        reference = MegatronReference(ref_model, arch, offload=torch.cuda.is_available(),
                                      kernel_impl=cfg.kernels.impl, packing=cfg.train.packing)
    generator = make_generator(cfg, policy, arch, model_dir, layout)
    executor = reward_executor(cfg)
    files = train_files(cfg)
    if algo.loss.spec.stage1 == "vstar":  # the policy is still the initial model here (a resume loads weights later)
        files = vstar_files(cfg, files, generator, tokenizer, arch, executor, layout)
    source = PromptSource(files, tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens, seed=cfg.run.seed,
                          shuffle=cfg.data.shuffle)
    return Components(cfg, arch, model_dir, tokenizer, policy, reference, kind, generator, source, executor,
                      algo, rollout_sampling(cfg, tokenizer, arch), layout)
