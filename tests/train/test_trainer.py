"""The RL loop end to end on a tiny random model (TP=1, in-process): every algorithm family runs with finite,
non-trivial losses and the contract's metrics; splitting a mini-batch into micro-batches changes nothing; a run
stopped and resumed, or killed with SIGKILL and resumed, logs exactly what an uninterrupted run logs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megarl.config import load_config
from megarl.data.kk_dataset import write_kk_dataset
from megarl.data.parquet import read_rows, write_rows
from megarl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
BASE = ["model.hf_dir=tiny:qwen2", "rollout.group_size=4", "rollout.max_tokens=8", "train.prompts_per_step=2",
        "train.steps=2", "optim.lr=1e-3", "reward.num_workers=0", "metrics.progress=false",
        "reward.custom_fn=tests.train.rewards:text_hash_reward", "checkpoint.export_hf=false"]
CONTRACT = ("reward/mean", "reward/acc", "response/length_mean", "loss/total", "optim/grad_norm", "optim/lr",
            "rollout/logprob_diff_max", "actor/entropy", "time/generation", "time/update", "perf/tokens_per_s")
TIMING = ("time/", "perf/", "rollout/queue_wait_seconds")  # wall-clock measurements


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def make_data(d: Path) -> Path:
    """2-person K&K prompts (train.parquet), and a copy with an A*-PO V* column (vstar.parquet)."""
    write_kk_dataset(d, 16, 4, [2], seed=3)
    rows = read_rows(d / "train.parquet")
    for i, r in enumerate(rows):
        r["extra_info"]["v_star"] = 0.25 * (i % 3)
    write_rows(d / "vstar.parquet", rows)
    return d


def run(tmp: Path, data_dir: Path, *overrides: str) -> list[dict]:
    from megarl.trainer import run_training

    cfg = load_config(None, [*BASE, f"run.dir={tmp}", f"data.train_files={data_dir / 'train.parquet'}", *overrides])
    run_training(cfg)
    return read_metrics(tmp / "metrics.jsonl")


def same_metrics(a: list[dict], b: list[dict], tol: float = 0.0, skip: tuple[str, ...] = ()) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(TIMING + skip)}
        assert keys == {k for k in rb if not k.startswith(TIMING + skip)}
        for k in sorted(keys):
            assert math.isclose(ra[k], rb[k], rel_tol=tol, abs_tol=tol), (ra["step"], k, ra[k], rb[k])


FAMILIES = {
    "grpo": [],
    "dr_grpo": ["algo.loss=dr_grpo", "algo.advantage=dr_grpo"],
    "dapo": ["algo.loss=dapo", "rollout.dynamic_sampling=true", "rollout.overlong_buffer=4"],
    "trw_entropy": ["algo.loss=trw_entropy"],
    "trpa": ["algo.loss=trpa"],
    "astar_po": ["algo.loss=astar_po", "rollout.group_size=1", "data.train_files=VSTAR"],
    "rpg": ["algo.loss=rpg_rf_fkl_clip", "algo.advantage=rpg", "optim.name=schedulefree"],
    "reinforce_pp": ["algo.loss=reinforce_pp", "algo.advantage=reinforce_pp_baseline"],
    "gspo": ["algo.loss=gspo"], "gmpo": ["algo.loss=gmpo"], "cispo": ["algo.loss=cispo"], "sapo": ["algo.loss=sapo"],
    "clip_cov": ["algo.loss=clip_cov"], "kl_cov": ["algo.loss=kl_cov", "algo.loss_hparams={select_ratio: 0.05}"],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_with_finite_losses(megatron_world, tmp_path, data_dir, family):
    overrides = [o.replace("VSTAR", str(data_dir / "vstar.parquet")) for o in FAMILIES[family]]
    rows = run(tmp_path / "run", data_dir, *overrides)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in CONTRACT if k not in r]
        assert not missing, missing
        assert all(math.isfinite(v) for v in r.values())
    # (the on-policy loss value can be exactly 0 -- advantages sum to 0 per group -- its gradient is not)
    assert all(r["optim/grad_norm"] > 0 for r in rows)
    # the sampler's log-probs and the trainer's teacher-forced log-probs of the same weights agree
    assert max(r["rollout/logprob_diff_max"] for r in rows) < 1e-3
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "trainer_state.json").is_file()


def test_micro_batch_split_does_not_change_the_update(megatron_world, tmp_path, data_dir):
    """One micro-batch per group vs the whole mini-batch in one: identical losses, gradient norms and, through the
    updated weights, identical second steps (the global-count normalisation inside the real loop)."""
    small = run(tmp_path / "small", data_dir, "algo.loss=trpa", "train.micro_batch_tokens=1")
    large = run(tmp_path / "large", data_dir, "algo.loss=trpa", "train.micro_batch_tokens=100000")
    # loss/* diagnostics included: each micro-batch logs its share of the mini-batch's value, and they are summed
    same_metrics(small, large, tol=1e-5, skip=("batch/",))
    assert all(r["batch/micro_batches"] == 2 for r in small) and all(r["batch/micro_batches"] == 1 for r in large)


def test_rollout_correction_and_bypass_train_and_log(megatron_world, tmp_path, data_dir):
    """rollout_is=token + rollout_rs=geometric trains and logs the mismatch; the native generator samples with the
    trainer's own weights, so the weights are ~1 and nothing is rejected. Bypass (the sampler's log-probs as
    pi_old, no old pass) then matches the run that recomputes them, up to that sampler/trainer difference."""
    hp = "algo.loss_hparams={rollout_is: token, rollout_rs: geometric}"
    corrected = run(tmp_path / "corr", data_dir, hp)
    plain = run(tmp_path / "plain", data_dir)
    for r in corrected:
        assert all(math.isfinite(v) for v in r.values()) and r["optim/grad_norm"] > 0
        assert abs(r["rollout_corr/is_weight_mean"] - 1) < 1e-3 and r["rollout_corr/is_weight_max"] < 1.01
        assert r["rollout_corr/rejected_token_frac"] == 0 and r["rollout_corr/rejected_seq_frac"] == 0
        assert 0 <= r["rollout_corr/k3_kl"] < 1e-6 and abs(r["rollout_corr/log_ppl_diff"]) < 1e-3
    same_metrics(corrected, plain, tol=2e-3, skip=("rollout_corr/",))
    bypass = run(tmp_path / "bypass", data_dir, "algo.bypass_old_logprobs=true")
    assert all("actor/entropy" not in r and not any(k.startswith("rollout_corr/") for k in r) for r in bypass)
    assert all(r["rollout/logprob_diff_max"] == 0 for r in bypass)  # pi_old is the sampler's, exactly
    same_metrics(bypass, plain, tol=2e-3, skip=("rollout_corr/", "actor/entropy", "rollout/logprob_diff_max"))


def test_nonfinite_updates_are_skipped_and_a_run_of_them_stops(megatron_world, tmp_path, data_dir):
    """Rewards of +-1e300 make Dr. GRPO's float32 advantages inf: each update is skipped (weights, schedule and
    checkpoints untouched), counted, and the third in a row stops the run with an error naming the step."""
    with pytest.raises(ValueError, match=r"step 3: the loss or the gradients were NaN/inf in 3 steps in a row"):
        run(tmp_path / "r", data_dir, "algo.loss=dr_grpo", "reward.custom_fn=tests.train.rewards:huge_reward",
            "train.steps=5")
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [(r["optim/skipped"], r["optim/nonfinite"]) for r in rows] == [(1.0, 1.0)] * 3
    assert not list((tmp_path / "r" / "checkpoints").glob("step_*"))  # nothing NaN was ever written


def test_a_damaged_checkpoint_is_named_and_resume_falls_back(megatron_world, tmp_path, data_dir, capsys):
    """One flipped byte in the newest checkpoint's shard: reading it names the file; a resume passes over it to
    the newest intact checkpoint and then logs exactly what an uninterrupted run logs."""
    run(tmp_path / "r", data_dir, "train.steps=2", "checkpoint.interval=1")
    ckpt = tmp_path / "r" / "checkpoints" / "step_000002"
    shard = sorted((ckpt / "model").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    from megarl.backends.megatron.checkpoint import read_meta

    with pytest.raises(ValueError, match=f"{shard.name}: damaged"):
        read_meta(ckpt)
    resumed = run(tmp_path / "r", data_dir, "train.steps=3", "checkpoint.interval=1")
    assert "checkpoint step_000002 is damaged and is set aside" in capsys.readouterr().out
    assert (tmp_path / "r" / "checkpoints" / ".step_000002.damaged").is_dir()
    same_metrics(resumed, run(tmp_path / "whole", data_dir, "train.steps=3", "checkpoint.interval=1"))


# the Triton kernel (through its interpreter on CPU) and RPG's run with -m slow; both log-prob paths are also
# checked against HF at every layout by tests/parallel (worker_parity.py, worker_cp.py)
@pytest.mark.parametrize("family,impl", [("trw_entropy", "torch"),
                                         pytest.param("trw_entropy", "triton", marks=pytest.mark.slow),
                                         pytest.param("rpg", "torch", marks=pytest.mark.slow)])
def test_fused_output_layer_path_equals_the_logits_path(megatron_world, tmp_path, data_dir, family, impl):
    """kernels.impl=auto (hidden states -> fused output layer, no logits) against the logits path through the plain
    torch reference and through the Triton kernel: the same losses, gradient norms and entropies over three updates,
    old and reference passes included (TRW-entropy reads the entropy, RPG the old policy)."""
    extra = ("train.steps=3", *FAMILIES[family])
    fused = run(tmp_path / f"{family}_auto", data_dir, *extra)
    same_metrics(fused, run(tmp_path / f"{family}_{impl}", data_dir, *extra, f"kernels.impl={impl}"), tol=2e-5)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_activation_recompute_changes_nothing_but_memory(megatron_world, tmp_path, data_dir, recompute):
    """model.recompute re-runs layers (or core attention) in backward instead of storing their activations: the
    same arithmetic, so the same metrics; the reference and generator passes (eval mode) are untouched."""
    stored = run(tmp_path / "stored", data_dir, "train.steps=2")
    same_metrics(stored, run(tmp_path / recompute, data_dir, "train.steps=2", f"model.recompute={recompute}"),
                 tol=1e-6)


def test_stop_and_resume_equals_uninterrupted(megatron_world, tmp_path, data_dir):
    straight = run(tmp_path / "a", data_dir, "train.steps=4", "optim.name=schedulefree")
    run(tmp_path / "b", data_dir, "train.steps=2", "optim.name=schedulefree")
    resumed = run(tmp_path / "b", data_dir, "train.steps=4", "optim.name=schedulefree")
    same_metrics(straight, resumed)


def test_resume_refuses_a_changed_algorithm(megatron_world, tmp_path, data_dir):
    run(tmp_path / "r", data_dir, "train.steps=1")
    with pytest.raises(ValueError, match=r"algo.loss: 'grpo' -> 'dapo'.*use a new run.dir"):
        run(tmp_path / "r", data_dir, "train.steps=2", "algo.loss=dapo")
    # the kernel is not part of the experiment: a resumed run may switch it
    assert [r["step"] for r in run(tmp_path / "r", data_dir, "train.steps=2", "kernels.impl=torch")] == [1, 2]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(megatron_world, tmp_path, data_dir):
    import psutil

    straight = run(tmp_path / "a", data_dir, "train.steps=4")
    killed = tmp_path / "k"
    args = [*BASE, f"run.dir={killed}", f"data.train_files={data_dir / 'train.parquet'}", "train.steps=4",
            "checkpoint.interval=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "megarl.cli", "train", *args], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while len(read_metrics(killed / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, f"the training run ended before it could be killed:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    time.sleep(1.0)  # inside step 3 (or its checkpoint)
    helpers = psutil.Process(proc.pid).children(recursive=True)  # e.g. the checkpoint writer's queue manager
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(killed / "metrics.jsonl")) < 4, "killed too late to test anything"
    _, alive = psutil.wait_procs(helpers, timeout=30)
    assert not alive, f"processes of the killed run outlived it: {[p.cmdline() for p in alive]}"
    resumed = run(killed, data_dir, "train.steps=4", "checkpoint.interval=1")
    same_metrics(straight, resumed)


def test_schedulefree_checkpoint_serves_the_averaged_weights(megatron_world, tmp_path, data_dir):
    """`megarl export` of a schedule-free run's checkpoint (its dist-checkpointed x, through conversion) equals the
    run's live end-of-run HF export (x), and differs from the checkpoint's training weights y."""
    import json
    import shutil

    from safetensors.torch import load_file

    from tests.cli import megarl

    def run_cli(*args):
        proc = megarl(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "run", data_dir, "optim.name=schedulefree", "checkpoint.export_hf=true")
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "megarl.json").read_text())["weights"] == "eval_model"
    run_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "x"))
    y_ckpt = tmp_path / "y_ckpt"
    shutil.copytree(ckpt, y_ckpt)
    meta = json.loads((y_ckpt / "megarl.json").read_text())
    (y_ckpt / "megarl.json").write_text(json.dumps({**meta, "weights": "model"}))
    from megarl.checksums import write_checksums

    write_checksums(y_ckpt)  # an edited checkpoint is refused as damaged until its checksums are made again
    run_cli("convert", "mcore-to-hf", str(y_ckpt), str(tmp_path / "y"))
    live, x, y = (load_file(tmp_path / d / "model-00001-of-00001.safetensors") for d in ("run/hf", "x", "y"))
    assert live.keys() == x.keys() == y.keys()
    for k in live:
        assert torch.equal(live[k], x[k]), k
    assert any(not torch.equal(x[k], y[k]) for k in x)


def test_tensorboard_and_offline_wandb_get_the_jsonl_metrics(megatron_world, tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = run(tmp_path / "run", data_dir, "metrics.tensorboard=true", "metrics.wandb=true")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    for key in ("reward/mean", "loss/total", "optim/grad_norm"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        for e, r in zip(events, rows):
            assert math.isclose(e.value, r[key], rel_tol=1e-6, abs_tol=1e-7), key
    (wandb_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(wandb_file)
    assert [h["_step"] for h in history] == [1, 2]
    for h, r in zip(history, rows):
        assert math.isclose(h["reward/mean"], r["reward/mean"], rel_tol=1e-6)


def wandb_history(path: Path) -> list[dict]:
    """The logged rows of an offline wandb run, read from its .wandb file: a LevelDB-style log (7-byte file header;
    32 KiB blocks of records with a 7-byte header: crc32, uint16 length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) of
    protobuf ``Record`` messages -- an independent reading of what wandb stored."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, pending, out = path.read_bytes(), 7, 32768, b"", []
    assert raw[:4] == b":W&B", f"{path}: not a wandb log"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


def test_bf16_training_runs_with_fp32_main_weights(megatron_world, tmp_path, data_dir):
    """bf16 weights and activations, Megatron's fp32 main weights in the optimizer: finite, moving, and the
    sampler's log-probs agree with the teacher-forced ones to bf16 precision."""
    rows = run(tmp_path / "run", data_dir, "model.dtype=bfloat16")
    for r in rows:
        assert all(math.isfinite(v) for v in r.values())
        assert r["optim/grad_norm"] > 0 and r["optim/skipped"] == 0
        assert r["rollout/logprob_diff_max"] < 0.5
    fp32 = run(tmp_path / "fp32", data_dir)
    assert math.isclose(rows[0]["reward/mean"], fp32[0]["reward/mean"])  # same samples at step 1 ...
    assert math.isclose(rows[0]["loss/total"], fp32[0]["loss/total"], abs_tol=0.05)  # ... and nearly the same loss
