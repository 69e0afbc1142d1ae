"""`megarl demo --algo all`'s bookkeeping on hand-made run folders: the numbers of each family's record, the table,
the plot, and that a finished family is not run again."""

from __future__ import annotations

import json

import matplotlib.image

from megarl import demo_compare
from megarl.data.parquet import write_rows


def fake_run(run, rewards, evals, vstar_rows=0):
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("rollout:\n  group_size: 8\n")
    with (run / "metrics.jsonl").open("w") as f:
        for i, r in enumerate(rewards):
            dynamic = {"rollout/sampled_groups": 12.0} if i == 0 else {}  # DAPO: 3 rounds of 4 prompts, 4 kept
            f.write(json.dumps({"step": i + 1, "reward/mean": r, "time/step": 2.0 + i, "rollout/groups": 4.0,
                                "rollout/responses": 32.0, **dynamic}) + "\n")
    with (run / "eval.jsonl").open("w") as f:
        for step, avg in evals:
            f.write(json.dumps({"step": step, "eval/arithmetic/avg@4": avg, "eval/arithmetic/pass@4": avg + 0.25,
                                "eval/arithmetic/prompts": 12.0}) + "\n")
    if vstar_rows:
        (run / "vstar").mkdir()
        write_rows(run / "vstar" / "train.parquet",
                   [{"data_source": "arithmetic", "prompt": [{"role": "user", "content": f"{i} + 1"}],
                     "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
                     "extra_info": {"index": i, "v_star": 0.1, "v_star_rewards": [0.0] * 8}}
                    for i in range(vstar_rows)])


def test_family_record_numbers(tmp_path):
    rewards = [-0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6]
    fake_run(tmp_path / "a", rewards, [(0, 0.1), (5, 0.5)], vstar_rows=3)
    rec = demo_compare.family_record("astar_po", tmp_path / "a", {"returncode": 0, "wall_s": 9.0,
                                                                 "peak_rss_gib": 1.5})
    assert rec["steps"] == 7 and rec["avg_at_k"] == {0: 0.1, 5: 0.5} and rec["pass_at_k"][5] == 0.75
    assert abs(rec["reward_first5"] - (-0.2)) < 1e-12 and abs(rec["reward_last5"] - 0.2) < 1e-12
    assert rec["step_s_median"] == 5.0  # times 2..8
    assert rec["elapsed_s"][:3] == [2.0, 5.0, 9.0]
    assert rec["samples"] == 12 * 8 + 6 * 32 + 3 * 8 and rec["vstar_samples"] == 24


def test_run_all_runs_each_family_once_and_writes_table_and_plot(tmp_path, monkeypatch):
    calls = []

    def fake_family(algo, run, overrides):
        calls.append((algo, overrides))
        fake_run(run, [-0.5, 0.0, 0.5], [(0, 0.1), (3, 0.6 if algo == "grpo" else 0.2)])
        return {"returncode": 0, "wall_s": 1.0, "peak_rss_gib": 2.0}

    monkeypatch.setattr(demo_compare, "_run_family", fake_family)
    args = [f"run.dir={tmp_path}", "train.steps=3"]
    assert demo_compare.run_all(args, algos=["grpo", "dapo"]) == 0
    assert calls == [("grpo", ["train.steps=3"]), ("dapo", ["train.steps=3"])]
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert table[0].startswith("| family | avg@k 0 | avg@k 3 | pass@k end |")
    assert table[2].startswith("| grpo | 0.100 | 0.600 | 0.850 |") and table[3].startswith("| dapo | 0.100 | 0.200 |")
    image = matplotlib.image.imread(tmp_path / "compare.png")
    assert image.shape[1] > 1000 and image[..., :3].std() > 0
    assert demo_compare.run_all(args, algos=["grpo", "dapo"]) == 0 and len(calls) == 2  # both already done
    assert demo_compare.run_all([*args, "optim.lr=1e-5"], algos=["grpo"]) == 0 and len(calls) == 3  # new settings


def test_run_all_reports_a_failed_family(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_compare, "_run_family", lambda *a: {"returncode": 2, "wall_s": 0, "peak_rss_gib": 0})
    assert demo_compare.run_all([f"run.dir={tmp_path}"], algos=["trpa"]) == 1
    assert not (tmp_path / "compare.md").exists()
