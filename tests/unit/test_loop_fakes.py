"""The RL loop (megarl/trainer/loop.py) driven through its protocols with in-memory fakes of the Policy and the
Generator, in seconds: the order of the phases in a step, the metrics it logs, the checkpoint cadence, and resume
bookkeeping (the step, the prompt stream's position and the policy's own state come back from the checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megarl.algo import resolve
from megarl.backends.protocols import Completion, GeneratesNow, SamplingParams
from megarl.config import load_config
from megarl.data.source import Prompt
from megarl.metrics import read_metrics
from megarl.parallel import ParallelDims, RankLayout
from megarl.rewards.executor import RewardExecutor
from megarl.trainer.build import Components


class Log(list):
    def __call__(self, event: str) -> None:
        self.append(event)


class FakeGenerator(GeneratesNow):
    """Answers prompt u with the tokens of str(u % 3) (or "x"), whatever the seed. ``sampled_with[u]``: the policy
    version its weights held when prompt u was sampled."""

    def __init__(self, policy, log: Log):
        self.policy, self.log, self.synced, self.sampled_with = policy, log, -1, {}
        self.all_wrong: set[int] = set()  # prompts whose every sample is wrong (dynamic sampling drops them)

    @property
    def stale(self) -> bool:
        return self.synced != self.policy.version

    def sync(self) -> dict[str, float]:
        self.log("sync")
        self.synced = self.policy.version
        return {"sync/seconds": 0.0}

    def generate(self, prompts, n, sampling, seeds=None):
        self.log("generate")
        self.sampled_with.update({p[0]: self.synced for p in prompts})
        return [[Completion([ord(str(p[0] % 3) if j % 2 and p[0] not in self.all_wrong else "x")], [-0.5], "stop")
                 for j in range(n)] for p in prompts]

    def sleep(self):
        self.log("sleep")

    def wake_up(self):
        pass

    def close(self):
        pass


class FakePolicy:
    """Weights: one number that each update adds the mean advantage to; logprobs equal the sampler's (-0.5)."""

    def __init__(self, log: Log, die_at: int = 0):
        self.version, self.weight, self.log, self.point, self.die_at = 0, 0.0, log, False, die_at
        self.trained: list[tuple[int, list[int]]] = []  # (version trained from, prompt ids of the rows)

    def rollout_point(self, active: bool) -> None:
        self.log(f"rollout_point {active}")

    def logprobs(self, ro, token_budget, temperature):
        self.log("old_logprobs")
        shape = (len(ro), ro.max_response_len)
        return torch.full(shape, -0.5) * ro.response_mask(), torch.zeros(shape)

    def train_step(self, ro, groups, loss, token_budget, temperature):
        self.log("train_step")
        rows = [i for g in groups for i in g]
        if len(self.trained) + 1 == self.die_at:
            raise KeyboardInterrupt("killed")
        self.trained.append((self.version, sorted({ro.prompt_ids[i][0] for i in rows})))
        self.weight += float(ro.advantages[rows].sum())
        self.version += 1
        return {"loss/total": 0.25, "optim/grad_norm": 1.0, "optim/lr": 1e-3, "optim/skipped": 0.0,
                "optim/nonfinite": 0.0}

    def save(self, out: Path) -> dict:
        self.log("save")
        (out / "fake_policy.json").write_text(json.dumps({"weight": self.weight}))
        return {"version": self.version}

    def load(self, ckpt: Path, state: dict) -> None:
        self.log("load")
        self.weight = json.loads((ckpt / "fake_policy.json").read_text())["weight"]
        self.version = state["version"] + 1


class FakeSource:
    def take(self, position: int, n: int) -> list[Prompt]:
        return [Prompt(pos, [pos], "arithmetic", str(pos % 3), {}) for pos in range(position, position + n)]


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def components(run: Path, log: Log, steps: int, *extra: str, die_at: int = 0) -> Components:
    cfg = load_config(None, [*extra, "model.hf_dir=tiny:qwen2", f"run.dir={run}", f"train.steps={steps}",
                             "train.prompts_per_step=2", "rollout.group_size=4", "checkpoint.interval=2",
                             "checkpoint.export_hf=false", "metrics.progress=false", "reward.num_workers=0",
                             "algo.loss_hparams={kl_coef: 0}"], world_size=1)
    policy = FakePolicy(log, die_at)
    one_rank = RankLayout(ParallelDims(), dp_rank=0, dp_size=1, dp_group=None, model_group=None)  # the world group
    return Components(cfg, None, run, FakeTokenizer(), policy, None, "none", FakeGenerator(policy, log),
                      FakeSource(), RewardExecutor(num_workers=0), resolve(cfg), SamplingParams(max_tokens=4), one_rank)


def test_a_step_runs_its_phases_in_order_and_logs_its_metrics(megatron_world, tmp_path):
    from megarl.trainer.loop import train
    from megarl.trainer.state import prepare_run_dir

    log = Log()
    c = components(tmp_path / "run", log, steps=3)
    prepare_run_dir(c.cfg)
    train(c)
    step = ["rollout_point True", "sync", "generate", "sleep", "old_logprobs", "rollout_point False", "train_step"]
    assert log == [*step, *step, "save", *step, "save"]  # checkpoint.interval=2, and the last step
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # half of each group right (arithmetic reward 1/0), so every step has signal
        assert r["reward/acc"] == 0.5 and r["rollout/responses"] == 8 and r["loss/total"] == 0.25
        assert r["rollout/logprob_diff_max"] == 0.0 and r["sync/seconds"] == 0.0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000002", "step_000003"]


def test_resume_restores_step_position_and_the_policys_state(megatron_world, tmp_path):
    from megarl.trainer.loop import train
    from megarl.trainer.state import prepare_run_dir

    run = tmp_path / "run"
    whole = components(tmp_path / "whole", Log(), steps=4)
    prepare_run_dir(whole.cfg)
    train(whole)
    first = components(run, Log(), steps=2)
    prepare_run_dir(first.cfg)
    train(first)
    log = Log()
    second = components(run, log, steps=4)  # the same command with more steps resumes
    prepare_run_dir(second.cfg)
    train(second)
    assert log[0] == "load" and log.count("train_step") == 2
    assert second.policy.weight == pytest.approx(whole.policy.weight)  # the same updates as one uninterrupted run
    resumed, straight = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight):  # the prompt stream continued where it stopped: the same rewards
        assert (a["reward/mean"], a["rollout/responses"]) == (b["reward/mean"], b["rollout/responses"])


def test_one_step_off_trains_on_samples_exactly_one_version_old(megatron_world, tmp_path):
    from megarl.trainer.loop import train
    from megarl.trainer.state import prepare_run_dir

    log = Log()
    c = components(tmp_path / "run", log, 4, "rollout.max_staleness=1")
    prepare_run_dir(c.cfg)
    train(c)
    # the next step's round is submitted (with the weights of now) before this step's update
    assert log[:9] == ["rollout_point True", "sync", "generate", "generate", "sleep", "old_logprobs",
                       "rollout_point False", "train_step", "rollout_point True"]
    gen = c.generator.sampled_with
    for step, (version, prompts) in enumerate(c.policy.trained, start=1):
        assert prompts == [2 * step - 2, 2 * step - 1]  # the stream in order: nothing skipped or repeated
        assert {version - gen[u] for u in prompts} == ({0} if step == 1 else {1})  # sampled one update earlier
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["rollout/staleness_mean"], r["rollout/staleness_max"]) for r in rows] == [(0, 0), (1, 1), (1, 1),
                                                                                         (1, 1)]
    assert len(gen) == 8  # no round was sampled past the last step


PARTIAL = ("rollout.placement=ray", "rollout.partial=true")  # (the fake generator stands in for the fleet)


# k = 1: killed in step 4's update with step 5's round in flight, resumed from step 2's checkpoint (interval 2);
# k = 2: killed in step 5's update, resumed from step 4's; the resumed step samples with its own weights;
# k = 3 with partial rollouts: killed in step 6's update with the rounds of steps 7 and 8 in flight, resumed from 4's
@pytest.mark.parametrize("k,extra,steps,die_at,in_flight,kept,after_resume",
                         [(1, (), 5, 4, 1, 2, [0, 1, 1]), (2, (), 6, 5, 1, 4, [0, 1]),
                          (3, PARTIAL, 8, 6, 2, 4, [0, 1, 2, 3])])
def test_a_killed_asynchronous_run_resumes_without_losing_or_repeating_prompts(megatron_world, tmp_path, k, extra,
                                                                               steps, die_at, in_flight, kept,
                                                                               after_resume):
    from megarl.trainer.loop import train
    from megarl.trainer.state import prepare_run_dir

    straight = components(tmp_path / "whole", Log(), steps, f"rollout.max_staleness={k}", *extra)
    prepare_run_dir(straight.cfg)
    train(straight)
    run = tmp_path / "run"
    killed = components(run, Log(), steps, f"rollout.max_staleness={k}", *extra, die_at=die_at)
    prepare_run_dir(killed.cfg)
    with pytest.raises(KeyboardInterrupt):
        train(killed)
    # the next rounds were in flight
    assert sorted(killed.generator.sampled_with) == list(range(2 * (die_at + in_flight)))
    resumed = components(run, Log(), steps, f"rollout.max_staleness={k}", *extra)
    prepare_run_dir(resumed.cfg)
    train(resumed)
    done = [p for _, p in killed.policy.trained[:kept] + resumed.policy.trained]
    assert done == [p for _, p in straight.policy.trained]  # each prompt trained once, in order
    assert sorted(resumed.generator.sampled_with) == list(range(2 * kept, 2 * steps))  # lost rounds regenerated
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["rollout/staleness_max"] for r in rows][kept:] == after_resume


def test_one_step_off_with_dynamic_sampling_samples_extra_rounds_with_the_weights_being_trained(megatron_world,
                                                                                                 tmp_path):
    from megarl.trainer.loop import train
    from megarl.trainer.state import prepare_run_dir

    c = components(tmp_path / "run", Log(), 3, "rollout.max_staleness=1", "rollout.dynamic_sampling=true")
    c.generator.all_wrong = {0, 2, 5}  # dropped groups: steps 1 and 2 each need a second round
    prepare_run_dir(c.cfg)
    train(c)
    gen = c.generator.sampled_with
    trained = c.policy.trained
    # two kept groups per step; step 2's surplus group (7) is discarded as upstream does; none trained twice
    assert [p for _, p in trained] == [[1, 3], [4, 6], [8, 9]]
    # step 2: prompt 4 came from the first round (sampled in step 1, one update old), 6 from an extra round of now
    assert [trained[1][0] - gen[u] for u in (4, 6)] == [1, 0]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["rollout/rounds"] for r in rows] == [2, 2, 1]
    assert [r["rollout/staleness_mean"] for r in rows] == [0, 0.5, 1]


# syncs: step 1's, then one before each round that would fall more than k behind (k = 1: before every round
# submitted after an update, steps 2-6)
@pytest.mark.parametrize("k,staleness,syncs", [(2, [0, 1, 2, 1, 2, 1, 2], 3), (3, [0, 1, 2, 3, 1, 2, 3], 2)])
def test_bounded_staleness_pushes_weights_only_when_a_round_would_fall_more_than_k_behind(megatron_world, tmp_path,
                                                                                         k, staleness, syncs):
    """rollout.max_staleness=k >= 2: one-step-off, but the engine keeps its weights while the round it samples
    will be trained at most k steps after them; a weight sync every k steps instead of every step."""
    from megarl.trainer.loop import train
    from megarl.trainer.state import prepare_run_dir

    log = Log()
    c = components(tmp_path / "run", log, 7, f"rollout.max_staleness={k}")
    prepare_run_dir(c.cfg)
    train(c)
    gen = c.generator.sampled_with
    for step, (version, prompts) in enumerate(c.policy.trained, start=1):
        assert prompts == [2 * step - 2, 2 * step - 1]  # the stream in order: nothing skipped or repeated
        assert {version - gen[u] for u in prompts} == {staleness[step - 1]}  # the fake's own record of its weights
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["rollout/staleness_max"] for r in rows] == staleness  # what the loop logged agrees
    one_step_off = Log()
    c1 = components(tmp_path / "k1", one_step_off, 7, "rollout.max_staleness=1")
    prepare_run_dir(c1.cfg)
    train(c1)
    assert one_step_off.count("sync") == 6 and log.count("sync") == syncs


def test_partial_rollouts_keep_a_queue_of_k_rounds_in_flight(megatron_world, tmp_path):
    """rollout.partial=true with max_staleness=3: the rounds of the next 3 steps are in flight (submitted in stream
    order, each with the weights of its submission), a weight push every step; staleness climbs to 3 and stays."""
    from megarl.trainer.loop import train
    from megarl.trainer.state import prepare_run_dir

    log = Log()
    c = components(tmp_path / "run", log, 7, "rollout.max_staleness=3", *PARTIAL)
    prepare_run_dir(c.cfg)
    train(c)
    gen = c.generator.sampled_with
    staleness = [0, 1, 2, 3, 3, 3, 3]
    for step, (version, prompts) in enumerate(c.policy.trained, start=1):
        assert prompts == [2 * step - 2, 2 * step - 1]  # the stream in order: nothing skipped or repeated
        assert {version - gen[u] for u in prompts} == {staleness[step - 1]}
    assert [r["rollout/staleness_max"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == staleness
    assert len(gen) == 14  # no round past the last step
    assert log[:6] == ["rollout_point True", "sync", "generate", "generate", "generate", "generate"]
    assert log.count("sync") == 7  # a push every step, into the rounds in flight

