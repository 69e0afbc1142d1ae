"""What the trainer needs from a generator: the contract, not the transport. Implementations: the native Megatron
generator (``backends.megatron.generator``) and vLLM (``backends.vllm.engine``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal, Protocol

import torch


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"rollout.max_tokens ({self.max_tokens}) must be >= 1.")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature ({self.temperature}) must be >= 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p ({self.top_p}) must be in (0, 1].")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k ({self.top_k}) must be >= 0 (0 = off).")


@dataclasses.dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log p of each sampled token under the temperature-scaled distribution, before top-k/p
    finish_reason: Literal["stop", "length"]


class Generator(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        """n completions for each token-id prompt. ``seeds[i]`` seeds prompt i's samples (which then do not depend
        on the other prompts of the call); default ``sampling.seed * 100_003 + i``."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take new weights as (HF name, full tensor) pairs."""

    def sleep(self) -> None:
        """Free generation memory (caches) for colocated training."""

    def wake_up(self) -> None:
        """Restore what sleep freed."""

    def close(self) -> None:
        """Release the engine (before the process group it may use is torn down)."""
