"""What the trainer needs from its parts: the contracts, not the engines. The RL loop (``megarl.trainer.loop``)
talks to a ``Policy``, a ``Reference`` and a ``Generator`` through these methods only.

Implementations: ``MegatronPolicy`` / ``MegatronReference`` (``backends.megatron.policy``); the native Megatron
generator (``backends.megatron.generator``) and colocated vLLM (``backends.vllm.colocated``) as generators."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

if TYPE_CHECKING:
    from megarl.losses.registry import PolicyLoss
    from megarl.rollout.batch import Rollouts


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None

    def prompt_seeds(self, n: int) -> list[int]:
        """The default per-prompt seeds of a call with ``n`` prompts: ``seed * 100_003 + i`` (every generator)."""
        return [(self.seed if self.seed is not None else 0) * 100_003 + i for i in range(n)]

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
    # partial rollouts: (first token index, weights tag) of each run of tokens sampled with one set of weights, the
    # tag counting the generator's syncs (a segmenting generator's ``tag`` is the count of the weights it holds);
    # None: all tokens with the weights of the call's start
    segments: list[tuple[int, int]] | None = None


@dataclasses.dataclass
class Ticket:
    """A generate call in flight (``Generator.submit``): what ``collect`` needs to finish it. ``regenerated``: the
    generator had to sample it again with its current weights (an engine died), not those of submit time."""

    work: Any
    regenerated: bool = False


class GeneratesNow:
    """``submit``/``collect`` of a generator that cannot overlap generation with training (it runs on the trainer's
    own devices): submit generates at once, with the weights of that moment, as an asynchronous one would."""

    tag: int | None = None  # its completions carry no segments: all tokens of a call share one set of weights

    def submit(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
               seeds: list[int] | None = None, refresh: bool = True) -> Ticket:
        return Ticket(self.generate(prompts, n, sampling, seeds) if refresh else
                      self.generate_held(prompts, n, sampling, seeds))

    def generate_held(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                      seeds: list[int] | None = None) -> list[list[Completion]]:
        """``generate`` with the weights the generator holds, even if the policy has moved since (an engine with
        its own copy of the weights overrides this; one that runs the policy's own modules has no other)."""
        return self.generate(prompts, n, sampling, seeds)

    def collect(self, ticket: Ticket) -> list[list[Completion]]:
        return ticket.work


class Generator(Protocol):
    stale: bool  # its weights lag the policy's: the loop calls ``sync()`` before the next step's rollouts
    # the count of syncs behind the weights it holds where its completions carry ``segments`` (partial rollouts:
    # the Ray fleet); None where they do not
    tag: int | None

    def sync(self) -> dict[str, float]:
        """Take the policy's current weights (and check them); returns metrics (``sync/*``). Collective."""

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        """n completions for each token-id prompt. ``seeds[i]`` seeds prompt i's samples (which then do not depend
        on the other prompts of the call); default ``sampling.seed * 100_003 + i``."""

    def submit(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
               seeds: list[int] | None = None, refresh: bool = True) -> Ticket:
        """Start ``generate`` with the weights of now and return without waiting for it where the generator runs
        apart from the trainer (``rollout.placement=ray``); the trainer may update meanwhile (``max_staleness``).
        ``refresh=False``: keep the weights the engines hold even if the policy moved (``max_staleness`` >= 2).
        Collective, as ``generate``."""

    def collect(self, ticket: Ticket) -> list[list[Completion]]:
        """What ``generate`` would have returned for the submitted call. Collective."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take new weights as (HF name, full tensor) pairs."""

    def sleep(self) -> None:
        """Free generation memory (caches) for colocated training."""

    def wake_up(self) -> None:
        """Restore what sleep freed."""

    def close(self) -> None:
        """Release the engine (before the process group it may use is torn down)."""


class Reference(Protocol):
    def logprobs(self, ro: Rollouts, token_budget: int, temperature: float) -> torch.Tensor:
        """log p [B, R] of every response token of ``ro`` under the reference. Collective."""


class Policy(Protocol):
    """The model being trained, its optimizer and its schedule, behind what the RL loop and a weight sync need."""

    version: int  # bumped whenever the weights change (updates, loads, schedule-free point swaps)

    def rollout_point(self, active: bool) -> None:
        """Put the weights rollouts and old log-probs are taken at in place (``True``; schedule-free: the averaged
        point x) or the ones updates are taken at (``False``). A no-op for optimizers with one point."""

    def logprobs(self, ro: Rollouts, token_budget: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p, entropy) [B, R] of every response token of ``ro`` under the current weights. Collective."""

    def train_step(self, ro: Rollouts, groups: list[list[int]], loss: PolicyLoss, token_budget: int,
                   temperature: float) -> dict[str, float]:
        """One optimizer step on the rows of ``groups``; the step's metrics (``loss/*``, ``optim/*``). Collective."""

    def save(self, out: Path) -> dict:
        """Write the policy's checkpoint files (weights, optimizer) into ``out``; returns JSON-able state that the
        trainer stores beside them and hands back to ``load``. Collective."""

    def load(self, ckpt: Path, state: dict) -> None:
        """Restore what ``save`` wrote. Collective."""

    def export_hf(self, out: Path) -> None:
        """Write the weights rollouts are taken at as a Hugging Face model directory ``out``. Collective."""

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights as (HF name, full tensor) pairs, streamed (a weight sync's source). Collective."""

    def probe_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= 1 at temperature 1 (a weight sync's check). Collective."""

