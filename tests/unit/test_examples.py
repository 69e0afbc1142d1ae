"""The fast examples of examples/ run and say what they claim (the runs are in tests/train/test_examples.py)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_losses_on_tensors_micro_batching_is_exact():
    out = runpy.run_path(str(EXAMPLES / "losses_on_tensors.py"))["main"]()
    assert out["gap"] == 0.0 and out["loss"] != 0.0


def test_custom_reward_adds_its_bonus_to_the_rule_reward():
    from examples.custom_reward import brevity_bonus

    assert brevity_bonus("arithmetic", "12", "12") == {**brevity_bonus("arithmetic", "12", "12"), "score": 1.1}
    assert brevity_bonus("arithmetic", "13" + " " * 300, "12")["score"] == 0.0


def test_plot_metrics_writes_a_png(tmp_path):
    rows = [{"step": s, "reward/mean": s / 4, "actor/entropy": 2 - s / 10} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')
    plot = runpy.run_path(str(EXAMPLES / "plot_metrics.py"))["plot"]
    out = plot(tmp_path, ["reward/mean", "actor/entropy"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
