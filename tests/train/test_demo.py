"""`megarl demo` as a user runs it, shrunk to a tiny model and 2 steps: the arithmetic task is generated, the
trainer runs with held-out evaluations before and after, and the run ends with a PNG whose curves are the logged
metrics and a summary naming every output."""

from __future__ import annotations

import json

import pytest

from tests.cli import megarl

SHRINK = ["model.hf_dir=tiny:qwen2", "train.steps=2", "rollout.group_size=2", "train.prompts_per_step=2",
          "rollout.max_tokens=4", "rollout.overlong_buffer=2", "data.generate_size=16", "metrics.progress=false"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    r = megarl("demo", f"run.dir={run}", *SHRINK, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run, r.stdout


def test_demo_trains_evaluates_and_reports(demo_run):
    from megarl.data.parquet import read_rows
    from megarl.metrics import read_metrics
    from megarl.rewards import compute_score

    run, out = demo_run
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    evals = read_metrics(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2]  # before training, and at the end
    train = read_rows(run / "data" / "train.parquet")
    test = read_rows(run / "data" / "test.parquet")
    assert {r["data_source"] for r in train + test} == {"arithmetic"}
    assert not {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in test}
    row = train[0]
    a, op, b = row["prompt"][-1]["content"].split()
    truth = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert row["reward_model"]["ground_truth"] == str(truth)
    assert compute_score("arithmetic", f"It is {truth}.", row["reward_model"]["ground_truth"])["score"] == 1.0
    assert compute_score("arithmetic", f"{truth} or {truth + 1}", row["reward_model"]["ground_truth"])["score"] == 0
    for name in ("config", "metrics", "plot", "checkpoints", "HF model"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "held-out eval      step   0:" in out and "reward (mean)" in out


def test_demo_plot_shows_the_logged_curves(demo_run):
    import matplotlib.image

    from megarl.demo import PLOTTED, metrics_figure
    from megarl.metrics import read_metrics

    run, _ = demo_run
    image = matplotlib.image.imread(run / "demo.png")
    assert image.shape[0] > 200 and image.shape[1] > 3 * 200 and image[..., :3].std() > 0  # drawn, not blank
    rows, evals = read_metrics(run / "metrics.jsonl"), read_metrics(run / "eval.jsonl")
    fig = metrics_figure(rows, "t", evals)
    for ax, (key, label) in zip(fig.axes, PLOTTED):
        line = ax.get_lines()[0]
        assert ax.get_title() == label
        assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [r[key] for r in rows]
    held_out = fig.axes[1].get_lines()[1]  # the accuracy panel: held-out avg@4 before and after training
    assert list(held_out.get_xdata()) == [0, 2]
    assert list(held_out.get_ydata()) == [e["eval/arithmetic/avg@4"] for e in evals]


def test_demo_again_resumes_the_finished_run_without_repeating_it(demo_run):
    run, _ = demo_run
    before = (run / "metrics.jsonl").read_text(), (run / "eval.jsonl").read_text()
    r = megarl("demo", f"run.dir={run}", *SHRINK, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ((run / "metrics.jsonl").read_text(), (run / "eval.jsonl").read_text()) == before
    assert "steps 1-2" in r.stdout


def test_demo_rejects_an_unknown_algorithm():
    r = megarl("demo", "--algo", "ppo2", timeout=120)
    assert r.returncode == 2 and "invalid choice: 'ppo2'" in r.stderr


def test_every_demo_algorithm_is_a_valid_run():
    """`megarl demo --algo A` for each family: the config validates (loss and its hyperparameters, group size,
    batch split) and the reference the loss needs is built."""
    from megarl.algo import resolve
    from megarl.demo import ALGOS, demo_config

    for algo in ALGOS:
        cfg = demo_config(algo, []).validate(1)
        resolve(cfg)  # the reference the loss needs agrees with algo.reference
        assert cfg.run.dir == f"runs/demo-{algo}" and cfg.data.generate == "arithmetic"
