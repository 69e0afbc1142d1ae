"""The parallel layout of a run, owned in one place: the degrees, how the world divides into them, and the one
check of both against the world size and the model. Pure (no Megatron): the config, the converter and the
Megatron backend all ask this class.

    world = dp x pp x cp x tp     (Megatron's rank order tp-cp-ep-dp-pp)

Expert parallelism (``ep``, mixture-of-experts models only) splits each MoE layer's experts over ``ep`` ranks
taken from the data x context ranks of a pipeline stage (it adds no ranks: ep must divide dp x cp); tokens travel
to their experts' ranks and back (docs/moe.md). Expert weights are split over the expert-TP ranks as dense MLPs
over TP (Megatron's default expert_tensor_parallel_size = tp).

Context parallelism (``cp``) splits every sequence over ``cp`` ranks that hold the same weights and the same
prompts (docs/context_parallel.md); they are not data-parallel replicas: ``dp_group`` leaves them out, gradients
are summed over data x context ranks by Megatron DDP.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megarl.convert.arch import ModelArch


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """Tensor, pipeline, context and expert parallel degrees; data parallelism is what the world has left:
    ``dp(world_size) = world_size / (tp * pp * cp)`` (expert parallelism lies inside dp x cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: each sequence split over cp ranks (load-balanced chunks)
    ep: int = 1  # expert parallelism: each MoE layer's experts split over ep of the dp x cp ranks
    sp: bool = False  # sequence parallelism: not a degree; activations outside the TP matmuls split over tp ranks

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one replica of the model."""
        return self.tp * self.pp * self.cp

    def dp(self, world_size: int) -> int:
        return world_size // self.model_parallel

    def check(self, world_size: int | None = None, arch: ModelArch | None = None) -> ParallelDims:
        """Raise ValueError naming the config key and the valid values when the degrees do not fit the world or
        the model; returns self."""
        for key, value in (("tp", self.tp), ("pp", self.pp), ("cp", self.cp), ("ep", self.ep)):
            if value < 1:
                raise ValueError(f"parallel.{key}={value} must be >= 1.")
        if self.sp and self.tp == 1:
            raise ValueError("parallel.sp=true splits activations over the tensor-parallel ranks; it needs "
                             "parallel.tp > 1 (or set parallel.sp=false).")
        if arch is not None:
            self._check_model(arch)
        if world_size is not None and world_size % self.model_parallel:
            keys, sizes = ("tp", "pp", "cp") if self.cp > 1 else ("tp", "pp"), (self.tp, self.pp, self.cp)
            raise ValueError(f"world size {world_size} is not divisible by "
                             f"{' x '.join(f'parallel.{k}' for k in keys)} = "
                             f"{' x '.join(map(str, sizes[:len(keys)]))} = {self.model_parallel}; launch a multiple "
                             f"of {self.model_parallel} processes or choose {' x '.join(keys)} among the layouts "
                             f"that fit {world_size}: {_listed(layouts(world_size, len(keys)))}.")
        if world_size is not None and (world_size // self.model_parallel * self.cp) % self.ep:
            ranks = world_size // self.model_parallel * self.cp
            raise ValueError(f"parallel.ep={self.ep} must divide the data x context ranks of a pipeline stage "
                             f"(world {world_size} / (tp x pp) = {ranks}); valid values: "
                             f"{', '.join(str(d) for d in range(1, ranks + 1) if ranks % d == 0)}.")
        return self

    def _check_model(self, arch: ModelArch) -> None:
        tp, pp = self.tp, self.pp
        if arch.num_heads % tp or arch.num_kv_heads % tp:
            valid = [d for d in range(1, arch.num_kv_heads + 1)
                     if arch.num_kv_heads % d == 0 and arch.num_heads % d == 0]
            raise ValueError(f"parallel.tp={tp} must divide num_attention_heads ({arch.num_heads}) and "
                             f"num_key_value_heads ({arch.num_kv_heads}); valid values: {', '.join(map(str, valid))}.")
        if self.ep > 1 and not arch.is_moe:
            raise ValueError(f"parallel.ep={self.ep} splits the experts of a mixture-of-experts model; "
                             f"{arch.family} is dense. Use parallel.ep=1.")
        if arch.is_moe:
            self._check_experts(arch)
        elif arch.ffn_hidden_size % tp:
            raise ValueError(f"parallel.tp={tp} must divide intermediate_size ({arch.ffn_hidden_size}).")
        if arch.num_layers % pp:
            valid = [d for d in range(1, arch.num_layers + 1) if arch.num_layers % d == 0]
            raise ValueError(f"parallel.pp={pp} must divide num_hidden_layers ({arch.num_layers}); valid values: "
                             f"{', '.join(map(str, valid))}.")


    def _check_experts(self, arch: ModelArch) -> None:
        if arch.num_experts % self.ep:
            valid = [d for d in range(1, arch.num_experts + 1) if arch.num_experts % d == 0]
            raise ValueError(f"parallel.ep={self.ep} must divide the number of experts ({arch.num_experts}); valid "
                             f"values: {', '.join(map(str, valid))}.")
        if arch.moe_ffn_hidden_size % self.tp:
            raise ValueError(f"parallel.tp={self.tp} must divide each expert's intermediate size "
                             f"({arch.moe_ffn_hidden_size}; experts are split over TP like dense MLPs).")


def layouts(world_size: int, degrees: int = 3) -> list[str]:
    """Every tp x pp (x cp, ``degrees`` = 3) that divides ``world_size`` (the model's own limits aside), e.g. for
    an error message."""
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    return [f"tp={t} pp={p}" + (f" cp={c}" if degrees == 3 else "") for t in divisors for p in divisors
            for c in (divisors if degrees == 3 else [1]) if world_size % (t * p * c) == 0]


def _listed(items: list[str], most: int = 16) -> str:
    return ", ".join(items) if len(items) <= most else ", ".join(items[:most]) + f" (and {len(items) - most} more)"


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """This rank's place in the layout, and the process groups the trainer reduces over. The backend that makes the
    groups fills it in (``backends/megatron/parallel.py``: ``with model_parallel(dims) as layout``); the trainer
    reads its groups from here and never from the backend.

    - ``dp_group``: the ranks that hold different prompts. Step-level statistics (advantages, whitening, token
      selection), the global normalisers and every logged count or metric are reduced over it. Context-parallel
      ranks are not in it: they hold the same prompts, each a part of every sequence.
    - ``model_group``: the ranks of one model replica (tp x pp); weight syncs into a rollout engine run over it.
    - ``cp_rank``: this rank's place in its context-parallel group (0 when cp = 1); per-replica results are
      counted once, from cp_rank 0.
    - ``ep_rank``: this rank's place in its expert-parallel group (0 when ep = 1); it holds experts
      ep_rank x E/ep ... (ep_rank + 1) x E/ep - 1 of every MoE layer."""

    dims: ParallelDims
    dp_rank: int
    dp_size: int
    dp_group: Any
    model_group: Any
    cp_rank: int = 0
    ep_rank: int = 0

    def describe(self) -> str:
        d = self.dims
        return f"layout: tp={d.tp} pp={d.pp} cp={d.cp} dp={self.dp_size}" + (f" ep={d.ep}" if d.ep > 1 else "") \
            + (" sp" if d.sp else "")
