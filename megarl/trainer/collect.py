"""Rollout collection for one RL step: prompts -> n samples each -> rewards (with DAPO shaping and dynamic sampling)
-> advantages, and the rollout metrics. Runs on every rank; data-parallel replicas draw disjoint prompts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from megarl.advantages import compute_advantages
from megarl.losses.cov import covariance
from megarl.losses.registry import PolicyLoss
from megarl.backends.protocols import SamplingParams, Ticket
from megarl.distributed import all_reduce_sum
from megarl.data.source import Prompt, PromptSource
from megarl.rewards.executor import RewardExecutor, RewardRequest
from megarl.rewards.levels import levels_from_scores, truncated_last
from megarl.rollout.batch import Rollouts
from megarl.rollout.packing import balanced_partition
from megarl.rollout.shaping import dynamic_sampling_keep, overlong_penalty


@dataclasses.dataclass
class Round:
    """One batch of prompts handed to the generator: this replica's prompts, the call in flight, where the next
    round starts in the prompt stream, and how many optimizer steps the sampling weights had taken."""

    prompts: list[Prompt]
    ticket: Ticket | None
    end: int
    version: int
    n: int


def submit_round(generator, source: PromptSource, position: int, version: int, *, step: int, n: int,
                 sampling: SamplingParams, prompts_per_rank: int, dp_rank: int, dp_size: int,
                 refresh: bool = True) -> Round:
    """This replica's prompts of the round starting at stream ``position``, submitted: n samples per prompt; prompt
    u's samples are seeded by (step, u) alone, so they do not depend on which data-parallel rank draws the prompt,
    on what else is in its batch, or on when the round is collected. ``version``: the loop steps taken by the
    weights it is sampled with; ``refresh=False``: with the weights the generator holds (``Generator.submit``)."""
    prompts = source.take(position + dp_rank * prompts_per_rank, prompts_per_rank)
    ticket = _submit(generator, prompts, n, sampling, (sampling.seed or 0) * 7919 + step, refresh)
    return Round(prompts, ticket, position + prompts_per_rank * dp_size, version, n)


def _submit(generator, prompts: list[Prompt], n: int, sampling: SamplingParams, seed: int,
            refresh: bool = True) -> Ticket | None:
    if not prompts:
        return None
    # refresh is passed only when False: a generator written before it existed still serves max_staleness <= 1
    return generator.submit([p.ids for p in prompts], n, sampling, **({} if refresh else {"refresh": False}),
                            seeds=[(seed * 1_000_003 + p.uid) * 100_003 for p in prompts])


def generate(generator, prompts: list[Prompt], n: int, sampling: SamplingParams, seed: int) -> Rollouts:
    """n samples per prompt, now (seeded as ``submit_round``'s)."""
    return finish_round(generator, Round(prompts, _submit(generator, prompts, n, sampling, seed), 0, 0, n), 0)[0]


def finish_round(generator, r: Round, now: int) -> tuple[Rollouts, float]:
    """The round's samples (unscored) and the seconds spent waiting for them. ``now``: optimizer steps taken by
    the weights being trained; a round sampled again after an engine died was sampled with those."""
    t0 = time.perf_counter()
    outs = generator.collect(r.ticket) if r.ticket is not None else []
    version = now if r.ticket is not None and r.ticket.regenerated else r.version
    ro = Rollouts([], [], [], [], torch.tensor([p.uid for p in r.prompts for _ in range(r.n)], dtype=torch.int64))
    for p, completions in zip(r.prompts, outs):
        for c in completions:
            ro.prompt_ids.append(p.ids)
            ro.response_ids.append(c.token_ids)
            ro.sampler_logprobs.append(c.logprobs)
            ro.finish_reasons.append(c.finish_reason)
    ro.versions = torch.full((len(ro),), version, dtype=torch.int64)
    # partial rollouts: the loop pushes the weights being trained just before collecting, so the tokens whose tag is
    # the generator's current one (``tag``: its sync count) were sampled with them, if the sample started earlier
    if outs and all(c.segments is not None for cs in outs for c in cs):
        ro.switch_at = torch.tensor([switch_point(c, generator.tag) for cs in outs for c in cs],
                                    dtype=torch.int64)
    return ro, time.perf_counter() - t0


def switch_point(c, tag: int | None) -> int:
    """The first token of ``c`` sampled with the weights of sync ``tag`` when its earlier tokens were sampled with
    older ones; its length when none were (one set of weights throughout, or it ended before that sync)."""
    last_start, last_tag = c.segments[-1]
    return last_start if len(c.segments) > 1 and last_tag == tag else len(c.token_ids)


def score(ro: Rollouts, prompts: list[Prompt], n: int, tokenizer, executor: RewardExecutor, *, max_tokens: int,
          overlong_buffer: int, overlong_factor: float) -> dict[str, float]:
    """Fill rewards, acc, levels and v_star of ``ro``; returns the executor's failure counts."""
    reqs = [RewardRequest(p.data_source, tokenizer.decode(ro.response_ids[i * n + j], skip_special_tokens=True),
                          p.ground_truth, p.extra_info) for i, p in enumerate(prompts) for j in range(n)]
    results, stats = executor.score(reqs)
    rewards = torch.tensor([float(r["score"]) for r in results], dtype=torch.float64)
    if overlong_buffer:
        rewards = rewards + overlong_penalty(ro.response_lengths, max_tokens, overlong_buffer, overlong_factor)
    ro.rewards = rewards
    ro.acc = torch.tensor([float(bool(r.get("acc", False))) for r in results], dtype=torch.float64)
    levels = [int(r["level"]) for r in results] if all("level" in r for r in results) else \
        levels_from_scores([float(r["score"]) for r in results], [bool(r.get("acc", False)) for r in results])
    ro.levels = torch.tensor(truncated_last(levels, ro.finish_reasons), dtype=torch.int64)
    if all(p.v_star is not None for p in prompts):
        ro.v_star = torch.tensor([p.v_star for p in prompts for _ in range(n)], dtype=torch.float64)
    return {f"reward/{k}": float(v) for k, v in stats.items()}


def collect(first: Round, resubmit: Callable[[int], Round], *, now: int, generator, tokenizer,
            executor: RewardExecutor, prompts_per_rank: int, dp_size: int, dp_group, dynamic_sampling: bool,
            max_rounds: int, reward_opts: dict) -> tuple[Rollouts, int, dict[str, float]]:
    """This rank's scored rollouts for the step, the new stream position, and counters.

    ``first``: the step's first round, already submitted (by this step, or by the one before when
    ``rollout.max_staleness`` = 1). Without dynamic sampling that is all. With it (DAPO), groups whose responses all
    have the same accuracy are dropped and further rounds (``resubmit(position)``, sampled with the weights of now)
    are drawn until every replica together holds ``prompts_per_rank * dp_size`` groups or ``max_rounds`` rounds are
    spent; all replicas run the same rounds. ``now``: optimizer steps taken by the weights being trained.
    """
    parts, kept_groups, rounds, stats, r = [], 0, 0, {"rollout/queue_wait_seconds": 0.0}, first
    target = prompts_per_rank * dp_size
    while True:
        ro, waited = finish_round(generator, r, now)
        stats["rollout/queue_wait_seconds"] += waited
        for k, v in score(ro, r.prompts, r.n, tokenizer, executor, **reward_opts).items():
            stats[k] = stats.get(k, 0.0) + v
        rounds += 1
        if dynamic_sampling:
            stats["rollout/sampled_groups"] = stats.get("rollout/sampled_groups", 0.0) + len(r.prompts)
            ro = ro.select(dynamic_sampling_keep(ro.acc, ro.group_ids))
        parts.append(ro)
        kept_groups += len(ro.groups())
        if not dynamic_sampling or rounds >= max_rounds or all_reduce_sum({"k": kept_groups}, dp_group)["k"] >= target:
            break
        r = resubmit(r.end)
    ro = Rollouts.concat(parts)
    if dynamic_sampling:  # at most this replica's share; surplus groups are discarded as upstream does
        ro = ro.select([i for g in ro.groups()[:prompts_per_rank] for i in g])
    stats["rollout/rounds"] = float(rounds)
    return ro, r.end, stats


def gather_dp(values: list, group) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, values, group=group)
    return out


def balance_over_dp(ro: Rollouts, dp_group, dp_size: int) -> Rollouts:
    """The step's groups re-dealt to the data-parallel replicas so that each holds about the same number of tokens
    (sorted greedy over whole groups, ``rollout/packing.py``), instead of the same number of prompts: long-tailed
    lengths otherwise leave the replicas with short samples waiting for the one with long ones. Every replica
    computes the same deal from the gathered rows. Global normalisers make the update independent of it."""
    if dp_size == 1:
        return ro
    every = Rollouts.concat(gather_dp(ro, dp_group))
    groups = every.groups()
    sizes = [sum(len(every.prompt_ids[i]) + len(every.response_ids[i]) for i in g) for g in groups]
    mine = balanced_partition(sizes, dp_size)[dist.get_rank(dp_group)]
    return every.select([i for j in mine for i in groups[j]])


def advantages_over_dp(ro: Rollouts, name: str | None, dp_group) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Advantages of this rank's rows computed over the whole step (all DP replicas), so batch-level estimators
    (REINFORCE++ whitening) see the global batch; and the global reward / length metrics. ``name`` None (a loss
    that reads no advantages): the metrics only."""
    local = (ro.rewards.tolist() if ro.rewards is not None else [], ro.group_ids.tolist(),
             ro.response_lengths.tolist(), ro.acc.tolist() if ro.acc is not None else [],
             [f == "length" for f in ro.finish_reasons])
    parts = gather_dp(local, dp_group)
    me = dist.get_rank(dp_group)
    offset = sum(len(p[1]) for p in parts[:me])
    rewards = torch.tensor([r for p in parts for r in p[0]], dtype=torch.float64)
    gids = torch.tensor([g for p in parts for g in p[1]], dtype=torch.int64)
    lengths = torch.tensor([n for p in parts for n in p[2]], dtype=torch.int64)
    acc = torch.tensor([a for p in parts for a in p[3]], dtype=torch.float64)
    clipped = torch.tensor([c for p in parts for c in p[4]], dtype=torch.float64)
    metrics = {"rollout/responses": float(len(rewards))}
    if len(rewards) == 0:
        return (None if name is None else torch.zeros(0, 1)), metrics
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    metrics.update({"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1
                    else 0.0, "reward/acc": float(acc.mean()), "response/length_mean": float(lengths.double().mean()),
                    "response/length_max": float(lengths.max()), "response/clip_ratio": float(clipped.mean())})
    if name is None:
        return None, metrics
    adv = compute_advantages(name, rewards=rewards, group_ids=gids, mask=mask)
    return adv[offset: offset + len(ro)].float()[:, : ro.max_response_len], metrics


def select_over_dp(ro: Rollouts, loss: PolicyLoss, dp_group, seed: int) -> torch.Tensor | None:
    """The loss's per-step token selection (``LossSpec.select``: Clip-Cov, KL-Cov) made over every replica's rows
    at once, with a generator seeded per step (so a resumed run draws the same); this rank's rows. None when the
    loss selects nothing."""
    if loss.spec.select is None:
        return None
    mask = ro.response_mask()
    local = [(ro.advantages[i, :n].tolist(), ro.old_logprobs[i, :n].tolist())
             for i, n in enumerate(ro.response_lengths.tolist())]
    parts = gather_dp(local, dp_group)
    me = dist.get_rank(dp_group)
    offset = sum(len(p) for p in parts[:me])
    rows = [r for p in parts for r in p]
    if not rows:
        return torch.zeros_like(mask)
    width = max(len(a) for a, _ in rows)
    adv, old, m = (torch.zeros(len(rows), width, dtype=torch.float64) for _ in range(3))
    for i, (a, lp) in enumerate(rows):
        adv[i, :len(a)], old[i, :len(lp)], m[i, :len(a)] = torch.tensor(a), torch.tensor(lp), 1.0
    gen = torch.Generator().manual_seed(seed)
    sel = loss.spec.select(covariance(old, adv, m), m, loss.hparams, gen)
    return sel[offset: offset + len(ro), : mask.shape[1]].float()
