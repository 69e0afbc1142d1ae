"""Issue 21's security and silent-corruption cases that need no model: a planted RNG file is refused without
running, vLLM never reports usage, stale temporaries of another node survive, bad numbers in the config are one
named error."""

from __future__ import annotations

import os
import pathlib
import random

import numpy as np
import pytest
import torch

from megarl.config import load_config
from megarl.convert.hf_io import _host, remove_stale_tmp
from megarl.trainer.checkpointing import load_rng, rng_state, set_rng_state


class Planted:
    """What an attacker would put in rng/rank_0.pt: unpickling it touches a file (any code could run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_planted_rng_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save(Planted(marker), tmp_path / "rank_0.pt")
    with pytest.raises(ValueError, match="refused to load"):
        load_rng(tmp_path / "rank_0.pt")
    assert not marker.exists()


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "r.pt")
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_rng(tmp_path / "r.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_vllm_usage_statistics_are_off_once_the_engine_module_is_loaded(monkeypatch):
    monkeypatch.delenv("VLLM_NO_USAGE_STATS", raising=False)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    from megarl.backends.vllm import engine

    engine.no_telemetry()
    assert os.environ["VLLM_NO_USAGE_STATS"] == "1" and os.environ["DO_NOT_TRACK"] == "1"


def test_stale_temporaries_of_another_node_are_left_alone(tmp_path):
    out = tmp_path / "mcore"
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process here
    mine, theirs = tmp_path / f".mcore.tmp-{_host()}-{dead}", tmp_path / f".mcore.tmp-othernode-{dead}"
    mine.mkdir(), theirs.mkdir()
    remove_stale_tmp(out)
    assert not mine.exists() and theirs.exists()


BAD_CONFIGS = [  # (override, what the one-line error names) -- each silently accepted or a traceback before
    ("train.prompts_per_step=0", "train.prompts_per_step=0 must be >= 1"),
    ("train.prompts_per_step=-4", "train.prompts_per_step=-4 must be >= 1"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be >= 0.0"),
    ("optim.warmup_steps=-3", "optim.warmup_steps=-3 must be >= 0"),
    ("parallel.tp=0", "parallel.tp=0 must be >= 1"),
    ("parallel.pp=0", "parallel.pp=0 must be >= 1"),
    ("parallel.tp=-1", "parallel.tp=-1 must be >= 1"),
    ("train.minibatches_per_step=0", "train.minibatches_per_step=0 must be >= 1"),
    ("algo.vstar_samples=0", "algo.vstar_samples=0 must be >= 1"),
    ("algo.loss_hparams={clip_low: abc}", "clip_low='abc' of loss 'grpo' must be a number"),
    ("algo.loss_hparams={clip_hihg: 0.3}", "Did you mean 'clip_high'"),
    ("rollout.tp=0", "rollout.tp=0 must be >= 1"),
    ("rollout.tp=2", "rollout.tp=2 sizes the engines of rollout.placement=ray"),
    ("rollout.max_staleness=-1", "rollout.max_staleness=-1 must be >= 0"),
    ("rollout.partial=true", "needs rollout.placement=ray and rollout.max_staleness >= 1"),
    ("rollout.partial_tokens=0", "rollout.partial_tokens=0 must be >= 1"),
]


@pytest.mark.parametrize("override,message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_numbers_are_one_named_error(override, message):
    with pytest.raises(ValueError) as e:
        load_config(None, ["model.hf_dir=tiny:qwen2", override], world_size=1)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.cli
def test_the_cli_says_it_in_one_line_and_writes_nothing(tmp_path):
    from tests.cli import megarl

    r = megarl("train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}",
               "algo.loss_hparams={clip_low: abc}", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "megarl: error: hyperparameter clip_low='abc' of loss 'grpo' must be a number (default 0.2)."]
    assert not (tmp_path / "run").exists()


def test_config_yaml_is_written_atomically(tmp_path):
    from megarl.config import RunConfig, save_config

    save_config(RunConfig(), tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text().startswith("run:") and not list(tmp_path.glob(".*.tmp"))


def test_generated_arithmetic_is_distinct_or_refused(tmp_path):
    from megarl.data.arith_dataset import write_arith_dataset
    from megarl.data.parquet import read_rows

    write_arith_dataset(tmp_path, 96, 12, max_operand=9)
    train, test = read_rows(tmp_path / "train.parquet"), read_rows(tmp_path / "test.parquet")
    prompts = lambda rows: [str(r["prompt"]) for r in rows]  # noqa: E731
    assert len(set(prompts(train))) == 96 and len(set(prompts(test))) == 12
    assert not set(prompts(train)) & set(prompts(test))
    with pytest.raises(ValueError, match="1000 test rows asked, but operands 1..2 give only 1 distinct"):
        write_arith_dataset(tmp_path, 4, 1000, max_operand=2)  # before: 1000 copies of one problem
    with pytest.raises(ValueError, match="-5 training"):
        write_arith_dataset(tmp_path, -5, 1)


@pytest.mark.parametrize("source,truth,refused", [("openai/gsm8k", 7.0, True), ("math_dapo", 7.0, True),
                                                  ("aime2024", [7], True), ("openai/gsm8k", "7", False),
                                                  ("openai/gsm8k", 7, False), ("my_task", 7.0, False)])
def test_ground_truth_types_are_checked_at_read(tmp_path, source, truth, refused):
    """A float ground truth scored every right GSM8K answer as wrong, silently (issue 21); a source only a custom
    reward knows keeps whatever ground truth it likes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megarl.data.parquet import DataError, read_rows

    row = {"data_source": source, "prompt": [{"role": "user", "content": "q"}],
           "reward_model": {"ground_truth": truth}, "extra_info": {"index": 0}}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "d.parquet")  # as another tool would write it
    if refused:
        with pytest.raises(DataError, match=r"d.parquet row 0: field 'reward_model.ground_truth' is"):
            read_rows(tmp_path / "d.parquet")
    else:
        assert read_rows(tmp_path / "d.parquet")[0]["reward_model"]["ground_truth"] == truth


def test_checksums_name_a_changed_or_missing_file(tmp_path, monkeypatch):
    from megarl.checksums import verify_checksums, write_checksums

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.distcp").write_bytes(b"x" * 1000)
    (tmp_path / "megarl.json").write_text("{}")
    assert not verify_checksums(tmp_path)  # no list yet (an older checkpoint): nothing to check against
    write_checksums(tmp_path)
    assert verify_checksums(tmp_path)
    (tmp_path / "model" / "a.distcp").write_bytes(b"x" * 999 + b"y")
    with pytest.raises(ValueError, match=r"a.distcp: damaged"):
        verify_checksums(tmp_path)
    monkeypatch.setenv("MEGARL_SKIP_CHECKSUMS", "1")
    assert not verify_checksums(tmp_path)
    monkeypatch.delenv("MEGARL_SKIP_CHECKSUMS")
    (tmp_path / "model" / "a.distcp").unlink()
    with pytest.raises(ValueError, match=r"a.distcp: missing from the checkpoint"):
        verify_checksums(tmp_path)


@pytest.mark.cli
def test_a_full_disk_is_one_line_naming_the_path(tmp_path):
    """/dev/full answers every write with ENOSPC: the start of a run that cannot write its config says so."""
    from tests.cli import megarl

    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.yaml.tmp").symlink_to("/dev/full")
    r = megarl("train", "--config", "configs/tiny.yaml", f"run.dir={run}", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"megarl: error: disk full at {run / 'config.yaml'}; free space or choose another path (whatever was being "
        f"written was not finished and will be redone)."]
    assert not (run / "config.yaml").exists()


def test_a_raw_template_may_hold_braces():
    """Before: str.format read LaTeX braces as fields and raised a traceback."""
    from megarl.data.prompts import render_prompt

    text = render_prompt([{"role": "user", "content": "1 + 1"}], raw_template="Answer in \\boxed{}. {question} =")
    assert text == "Answer in \\boxed{}. 1 + 1 ="
    with pytest.raises(ValueError, match="placeholder"):
        render_prompt([{"role": "user", "content": "x"}], raw_template="no field")


def test_one_layout_check_serves_config_converter_and_backend():
    """megarl.parallel.ParallelDims owns the degrees: the config and the converter's check_parallel raise its
    messages (the backend's init_model_parallel calls the same check)."""
    from megarl.convert.arch import check_parallel, read_arch
    from megarl.parallel import ParallelDims

    arch = read_arch({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 64, "hidden_size": 32,
                      "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "intermediate_size": 64})
    assert ParallelDims(2, 2).check(8, arch).dp(8) == 2
    for call in (lambda: ParallelDims(2, 3).check(None, arch), lambda: check_parallel(arch, 2, 3)):
        with pytest.raises(ValueError, match=r"parallel.pp=3 must divide num_hidden_layers \(4\); valid values: 1, 2, 4"):
            call()
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.tp x parallel.pp = 2 x 2 = 4; "
                                         r".* fit 6: tp=1 pp=1, tp=1 pp=2, tp=1 pp=3, .*tp=6 pp=1\."):
        load_config(None, ["model.hf_dir=tiny:qwen2", "parallel.tp=2", "parallel.pp=2"], world_size=6)
    with pytest.raises(ValueError, match=r"world size 2 is not divisible by parallel.tp x parallel.pp x parallel.cp "
                                         r"= 1 x 1 x 4 = 4; .* fit 2: tp=1 pp=1 cp=1, tp=1 pp=1 cp=2, .*tp=2 pp=1 "
                                         r"cp=1\."):
        load_config(None, ["model.hf_dir=tiny:qwen2", "parallel.cp=4"], world_size=2)
    assert ParallelDims(2, 1, cp=2).check(8, arch).dp(8) == 2
    with pytest.raises(ValueError, match=r"parallel.ep=2 splits the experts of a mixture-of-experts model; qwen2 "
                                         r"is dense\. Use parallel.ep=1\."):
        ParallelDims(1, 1, ep=2).check(2, arch)
    from megarl.convert.tiny import tiny_hf_config

    moe = read_arch(tiny_hf_config("qwen3_moe").to_dict())  # 4 experts of intermediate size 64
    assert ParallelDims(2, 1, ep=2).check(4, moe).dp(4) == 2  # ep lies inside dp: no extra ranks
    with pytest.raises(ValueError, match=r"parallel.sp=true splits activations over the tensor-parallel ranks; it "
                                         r"needs parallel.tp > 1"):
        load_config(None, ["model.hf_dir=tiny:qwen2", "parallel.sp=true"], world_size=2)
    from megarl.parallel import RankLayout

    cfg = load_config(None, ["model.hf_dir=tiny:qwen2", "parallel.tp=2", "parallel.sp=true"], world_size=2)
    dims = cfg.parallel.dims()
    assert RankLayout(dims, 0, 1, None, None).describe() == "layout: tp=2 pp=1 cp=1 dp=1 sp"
    with pytest.raises(ValueError, match=r"parallel.ep=3 must divide the number of experts \(4\); valid values: "
                                         r"1, 2, 4\."):
        ParallelDims(1, 1, ep=3).check(3, moe)
    with pytest.raises(ValueError, match=r"parallel.ep=4 must divide the data x context ranks of a pipeline stage "
                                         r"\(world 4 / \(tp x pp\) = 2\); valid values: 1, 2\."):
        ParallelDims(2, 1, ep=4).check(4, moe)
    with pytest.raises(ValueError, match=r"parallel.tp=3 must divide each expert's intermediate size \(64"):
        ParallelDims(3, 1).check(None, read_arch({**tiny_hf_config("qwen3_moe").to_dict(), "num_attention_heads": 6,
                                                  "num_key_value_heads": 3, "head_dim": 32}))



# through the command, three in the default run (each starts a process, ~8 s); all of them with -m slow
THROUGH_CLI = ("train.prompts_per_step=0", "optim.lr=nan", "algo.loss_hparams={clip_hihg: 0.3}")


@pytest.mark.cli
@pytest.mark.parametrize("override,message", [b if b[0] in THROUGH_CLI else pytest.param(*b, marks=pytest.mark.slow)
                                              for b in BAD_CONFIGS], ids=[b[0] for b in BAD_CONFIGS])
def test_bad_numbers_through_the_command(tmp_path, override, message):
    """The same table as a user meets it: exit 2, one `megarl: error:` line naming the key, nothing on disk."""
    from tests.cli import megarl

    r = megarl("train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", override, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("megarl: error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.cli
@pytest.mark.parametrize("args,message", [
    (["eval", "ckpt", "--data", "d.parquet", "--n", "0"], "megarl eval: argument --n: 0 must be >= 1"),
    (["data", "arithmetic", "--out", "x", "--train", "-5"], "megarl data arithmetic: argument --train: -5 must be >= 1"),
    (["data", "kk", "--out", "x", "--people", "5-3"], "--people '5-3' is an empty range"),
])
def test_bad_arguments_are_one_line(args, message, tmp_path):
    """Argument errors too: one `megarl: error:` line (argparse's own form prints its usage first), exit 2."""
    from tests.cli import megarl

    r = megarl(*[a.replace("x", str(tmp_path / "out")) if a == "x" else a for a in args], timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("megarl: error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.cli
def test_a_yaml_syntax_error_and_a_float_ground_truth_through_the_command(tmp_path):
    """Two former tracebacks / silent cases as a user meets them: one line naming the file (and line, or row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.cli import megarl

    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  dir: [oops\n")
    r = megarl("train", "--config", str(bad), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"megarl: error: {bad}: not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'."]
    row = {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "q"}],
           "reward_model": {"ground_truth": 7.0}, "extra_info": {"index": 0}}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "d.parquet")
    r = megarl("data", "inspect", str(tmp_path / "d.parquet"), timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "d.parquet row 0: field 'reward_model.ground_truth' is float 7.0" \
        in lines[0]
