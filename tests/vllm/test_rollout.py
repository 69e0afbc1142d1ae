"""`megarl train` with rollout.backend=vllm: after every weight sync the engine's log-probs equal Megatron's (the
sync probe and rollout/logprob_diff_max, both < 1e-3 in fp32) at TP=1, TP=2 (vLLM's TP groups are Megatron's),
PP=2 and DP=2, which all log the TP=1 metrics; and a missed sync is caught."""

from __future__ import annotations

import math

import pytest

from megarl.metrics import read_metrics
from tests.parallel.launch import torchrun
from tests.train.test_trainer import TIMING, make_data
from tests.vllm.conftest import run_worker

pytestmark = [pytest.mark.vllm, pytest.mark.dist]

ARGS = ["rollout.backend=vllm", "rollout.vllm_kv_cache_mb=64", "rollout.group_size=4", "rollout.max_tokens=8",
        "train.prompts_per_step=2", "train.steps=3", "optim.lr=1e-3", "reward.num_workers=0",
        "metrics.progress=false", "reward.custom_fn=tests.train.rewards:text_hash_reward",
        "checkpoint.export_hf=false", "data.max_prompt_tokens=400"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


LAYOUTS = {"tp1": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]), "dp2": (2, []),
           "cp2": (2, ["parallel.cp=2"])}


def train(tmp_path, name, model, data_dir):
    nproc, overrides = LAYOUTS[name]
    torchrun("megarl.cli", nproc, "train", *ARGS, f"model.hf_dir={model}", f"run.dir={tmp_path / name}",
             f"data.train_files={data_dir / 'train.parquet'}", *overrides, timeout=600)
    return read_metrics(tmp_path / name / "metrics.jsonl")


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory, vllm_model, data_dir):
    return train(tmp_path_factory.mktemp("tp1"), "tp1", vllm_model, data_dir)


def check_synced(metrics, model):
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        model_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    embed_bytes = 49152 * 128 * 4  # the tied output layer is sent as lm_head.weight too
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:  # every step synced (the weights changed) and passed its check
        assert m["sync/probe_diff_max"] < 1e-3, m
        assert m["rollout/logprob_diff_max"] < 1e-3, m
        assert m["sync/bytes"] == model_bytes + embed_bytes
        assert m["optim/grad_norm"] > 0


# PP=2, DP=2 and CP=2 are `slow`: the weight sync's PP and DP paths are also covered by the fleet and trainer tests
@pytest.mark.parametrize("name", ["tp2"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("pp2", "dp2", "cp2")])
def test_synced_engine_agrees_with_megatron_at_layout(tmp_path, vllm_model, data_dir, tp1_run, name):
    """TP=2 (one vLLM engine over both ranks), PP=2 (an engine per stage, each with the whole model), DP=2
    (an engine per replica, different prompts) and CP=2 (an engine per context-parallel rank, the same prompts and
    seeds, so the same samples; the probe runs the context-parallel forward) log the TP=1 run's metrics."""
    check_synced(tp1_run, vllm_model)
    run = train(tmp_path, name, vllm_model, data_dir)
    check_synced(run, vllm_model)
    for a, b in zip(tp1_run, run):
        assert {k for k in a if not k.startswith(TIMING)} == {k for k in b if not k.startswith(TIMING)}
        # batch/*: each data-parallel rank packs its own samples
        skip = TIMING + ("sync/seconds",) + (("batch/",) if name in ("dp2", "cp2") else ())
        for k in a:
            if not k.startswith(skip):
                assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-4), (name, a["step"], k, a[k], b[k])


def test_a_missed_sync_is_caught(tmp_path, vllm_model, data_dir):
    out = run_worker("tests.vllm.worker_sync", str(vllm_model), str(tmp_path / "run"),
                     str(data_dir / "train.parquet"))
    assert out["first"]["sync/probe_diff_max"] < 1e-3
    assert out["missed_sync_error"] and "rollout.vllm_probe_tol" in out["missed_sync_error"]
    assert not out["stale_before_bump"] and out["stale_after_bump"]
    assert out["second"]["sync/probe_diff_max"] < 1e-3
