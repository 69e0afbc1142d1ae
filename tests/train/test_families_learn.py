"""Slow (estimated at 45 minutes on 2 cores): every algorithm family of `megarl demo` raises the training reward of the
bundled SmolLM2-135M-Instruct over its first steps, run through `megarl demo --algo all` as a user runs it.

Over the first steps the reward rises as the responses lose the overlong penalty and then get right (README, "The
demo"); a family that cannot run, or that does not learn from its reward, fails here. Run it with

    .venv/bin/python -m pytest -m slow tests/train/test_families_learn.py
"""

from __future__ import annotations

import json

import pytest

from megarl.demo import ALGOS
from tests.cli import megarl

STEPS = 8


@pytest.mark.slow
def test_every_family_raises_its_training_reward(tmp_path):
    root = tmp_path / "all"
    r = megarl("demo", "--algo", "all", f"run.dir={root}", f"train.steps={STEPS}", "eval.interval=0",
               "eval.before_train=false", "metrics.progress=false", "checkpoint.interval=0", timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = {rec["algo"]: rec for rec in json.loads((root / "compare.json").read_text())}
    assert set(records) == set(ALGOS)
    for algo, rec in records.items():
        first, last = rec["reward"][:2], rec["reward"][-3:]
        assert sum(last) / 3 > sum(first) / 2 + 0.1, (algo, rec["reward"])
    assert (root / "compare.png").is_file() and "| grpo |" in (root / "compare.md").read_text()
