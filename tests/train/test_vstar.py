"""A*-PO stage 1 (`megarl vstar`, and the phase `megarl train` runs when the data has no V*): V* against the
closed form, a constant-reward prompt's V* equal to that reward, resume after a stop, and training on the result."""

from __future__ import annotations

import math

import pytest

from megarl.config import load_config
from megarl.data.kk_dataset import write_kk_dataset
from megarl.data.parquet import read_rows
from megarl.metrics import read_metrics
from tests.train.rewards import prompt_constant

BASE = ["model.hf_dir=tiny:qwen2", "rollout.max_tokens=6", "reward.num_workers=0", "metrics.progress=false",
        "algo.vstar_samples=3", "checkpoint.export_hf=false"]
HASH = "reward.custom_fn=tests.train.rewards:text_hash_reward"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_kk_dataset(d, 7, 2, [2], seed=5)
    return d / "train.parquet"


def vstar(tmp, data, *overrides, **options):
    from megarl.trainer import run_vstar

    cfg = load_config(None, [*BASE, f"run.dir={tmp}", f"data.train_files={data}", *overrides])
    return [read_rows(f) for f in run_vstar(cfg, **options)]


def test_vstar_is_the_log_mean_exp_of_the_sample_rewards(megatron_world, tmp_path, data):
    (rows,) = vstar(tmp_path, data, HASH, "algo.vstar_beta1=0.5")
    src = read_rows(data)
    assert len(rows) == len(src)
    rewards = [r["extra_info"]["v_star_rewards"] for r in rows]
    assert all(len(r) == 3 for r in rewards)
    assert len({tuple(r) for r in rewards}) > 1  # the samples differ between prompts
    for row, orig, rs in zip(rows, src, rewards):
        want = 0.5 * math.log(sum(math.exp(r / 0.5) for r in rs) / len(rs))
        assert math.isclose(row["extra_info"]["v_star"], want, rel_tol=1e-12, abs_tol=1e-12)
        assert row["prompt"] == orig["prompt"] and row["reward_model"] == orig["reward_model"]


def test_vstar_of_a_constant_reward_is_that_reward(megatron_world, tmp_path, data):
    (rows,) = vstar(tmp_path, data, "reward.custom_fn=tests.train.rewards:prompt_constant_reward")
    for row in rows:
        assert math.isclose(row["extra_info"]["v_star"], prompt_constant(row["reward_model"]["ground_truth"]),
                            abs_tol=1e-12)


def test_stopped_vstar_resumes_to_the_uninterrupted_result(megatron_world, tmp_path, data):
    (full,) = vstar(tmp_path / "full", data, HASH, chunk=3)
    from megarl.trainer import run_vstar

    cfg = load_config(None, [*BASE, f"run.dir={tmp_path / 'cut'}", f"data.train_files={data}", HASH])
    (partial,) = run_vstar(cfg, chunk=3, stop_after_chunks=1)
    assert partial.endswith(".partial.jsonl")
    assert len(open(partial).read().splitlines()) == 3
    assert not (tmp_path / "cut" / "vstar" / "train.parquet").exists()
    with open(partial, "a") as f:
        f.write('{"row": 5, "rew')  # a line torn by a kill mid-write
    (resumed,) = vstar(tmp_path / "cut", data, HASH, chunk=3)
    assert [r["extra_info"] for r in resumed] == [r["extra_info"] for r in full]
    assert not (tmp_path / "cut" / "vstar" / "train.parquet.partial.jsonl").exists()


def test_astar_po_training_runs_stage_one_when_the_data_has_no_vstar(megatron_world, tmp_path, data):
    from megarl.trainer import run_training

    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}", f"data.train_files={data}", HASH, "algo.loss=astar_po",
                             "rollout.group_size=1", "train.prompts_per_step=2", "train.steps=2"])
    run_training(cfg)
    rows = read_rows(tmp_path / "vstar" / "train.parquet")
    assert all(r["extra_info"]["v_star"] is not None for r in rows)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    assert metrics[0]["optim/grad_norm"] > 0


def test_vstar_scores_with_the_overlong_shaping_that_training_applies(megatron_world, tmp_path, data):
    """Stage 2 regresses on shaped rewards, so stage 1 must shape the same samples the same way: with the same
    seeds the samples are the same, and each reward differs from the unshaped one by DAPO's penalty
    -(len - (max_tokens - buffer)) / buffer, which for max_tokens 6 and buffer 2 is 0, -0.5 or -1."""
    (plain,) = vstar(tmp_path / "plain", data, HASH)
    (shaped,) = vstar(tmp_path / "shaped", data, HASH, "rollout.overlong_buffer=2")
    diffs = [s - p for a, b in zip(shaped, plain)
             for s, p in zip(a["extra_info"]["v_star_rewards"], b["extra_info"]["v_star_rewards"])]
    assert all(min(abs(d - v) for v in (0.0, -0.5, -1.0)) < 1e-9 for d in diffs) and any(d < 0 for d in diffs)
    for row in shaped:
        rs = row["extra_info"]["v_star_rewards"]
        want = 0.5 * math.log(sum(math.exp(r / 0.5) for r in rs) / len(rs))
        assert math.isclose(row["extra_info"]["v_star"], want, rel_tol=1e-12, abs_tol=1e-12)


def test_vstar_is_estimated_again_when_its_settings_change(megatron_world, tmp_path, data):
    """The stage-1 output is tied to what made it (issue 21): another beta1 or sample count is a new estimate,
    the same settings reuse the file."""
    (first,) = vstar(tmp_path, data, HASH, "algo.vstar_beta1=0.5")
    (again,) = vstar(tmp_path, data, HASH, "algo.vstar_beta1=0.5")
    assert again == first
    (other,) = vstar(tmp_path, data, HASH, "algo.vstar_beta1=0")  # beta1 = 0: the plain mean of the samples
    for row in other:
        rs = row["extra_info"]["v_star_rewards"]
        assert math.isclose(row["extra_info"]["v_star"], sum(rs) / len(rs), rel_tol=1e-12, abs_tol=1e-12)
    (more,) = vstar(tmp_path, data, HASH, "algo.vstar_samples=4")
    assert all(len(r["extra_info"]["v_star_rewards"]) == 4 for r in more)
