"""The examples that train or convert, as a user runs them (shrunk where they take a size)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from megarl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def test_trpa_on_knights_and_knaves_trains(tmp_path):
    run = tmp_path / "trpa"
    r = subprocess.run(["bash", "examples/trpa_knights_and_knaves.sh", "rollout.max_tokens=16",
                        "metrics.progress=false"], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "MODEL": "tiny:qwen2", "STEPS": "2", "RUN": str(run)})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [x["step"] for x in rows] == [1, 2] and all("loss/pairs" in x for x in rows)


def test_custom_reward_from_the_console_script(tmp_path):
    """`megarl train ... reward.custom_fn=examples.custom_reward:brevity_bonus` from the repository root."""
    r = subprocess.run([str(REPO / ".venv/bin/megarl"), "train", "--config", "configs/tiny.yaml",
                        f"run.dir={tmp_path / 'r'}", "train.steps=1", "rollout.max_tokens=8",
                        "reward.custom_fn=examples.custom_reward:brevity_bonus", "reward.num_workers=1",
                        "metrics.progress=false", "checkpoint.export_hf=false"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert row["reward/errors"] == 0 and row["reward/mean"] >= -3 + 0.1  # every K&K score got its bonus


# slow: the same four commands run, with stronger checks, in tests/parallel/test_convert.py (smollm2 round trip)
@pytest.mark.slow
def test_convert_roundtrip_is_bit_exact(tmp_path):
    r = subprocess.run(["bash", "examples/convert_roundtrip.sh", str(tmp_path / "rt")], cwd=REPO,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "round trip bit-exact: " in r.stdout
