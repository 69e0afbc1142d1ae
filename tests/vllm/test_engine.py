"""The vLLM backend's engine against HF transformers (the independent reference): sampler and teacher-forced
log-probs, per-prompt seeds, greedy decoding, stop ids, in-place weight loads (tied embeddings, a prompt longer
than one KV-cache block after a load), and restoring weights. vLLM runs in a worker process: it changes
process-wide state (thread count, seeds) that must not leak into other tests."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import run_worker

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def result(vllm_model):
    return run_worker("tests.vllm.worker_engine", str(vllm_model))


def test_engine_names_and_logprobs_match_hf(result):
    assert result["expected_names_equal_checkpoint"]
    assert result["probe_vs_hf"] < 1e-4  # teacher-forced, 150 tokens
    assert result["sampler_vs_hf"] < 1e-4  # sampled tokens at temperature 0.7
    assert result["finish_reasons"] == ["length"]


def test_seeds_greedy_and_stop_ids(result):
    assert result["samples_within_group_differ"]
    assert result["prompt_alone_equals_in_batch"]
    assert result["oversized_call_equals_prompts_alone"]  # 12 x 400 prompt tokens, more than one step's budget
    assert result["greedy_equals_hf"]
    assert result["stopped"] == [True, "stop"]


def test_weight_loads_take_effect_everywhere(result):
    # without lm_head.weight the tied output layer stays stale: the trap the trainer's sync avoids
    assert result["probe_without_lm_head"] > 1e-2
    assert result["bytes_received"] == result["bytes_sent"]
    assert result["probe_after_load"] < 1e-4
    assert result["samples_changed"]
    assert result["sampler_vs_hf_after_load"] < 1e-4  # incl. the 150-token prompt cached before the load
    assert result["restored_samples_equal_first"]
