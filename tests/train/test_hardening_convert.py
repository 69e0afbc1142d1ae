"""Issue 21's conversion cases through the command a user runs: weights the config does not describe, NaN
weights, a config.json that is not an object, and a checkpoint with a damaged shard: each one line, exit 2, and
nothing written at the output path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megarl.convert.bundled import write_tiny_model
from tests.cli import megarl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "hf"
    write_tiny_model(d, "qwen2")
    return d


def edited(tiny, tmp_path, edit):
    d = tmp_path / "hf"
    shutil.copytree(tiny, d)
    (shard,) = d.glob("*.safetensors")
    tensors = load_file(shard)
    edit(d, tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return d


def one_line_error(r, *parts):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("megarl: error: "), r.stderr
    assert all(p in lines[0] for p in parts), lines[0]


def test_tensors_the_config_does_not_describe_are_refused(tiny, tmp_path):
    d = edited(tiny, tmp_path, lambda d, t: t.__setitem__("model.layers.99.mlp.gate_proj.weight", torch.zeros(2)))
    r = megarl("convert", "hf-to-mcore", str(d), str(tmp_path / "out"), timeout=300)
    one_line_error(r, "tensor(s) that config.json does not describe", "model.layers.99.mlp.gate_proj.weight")
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused(tiny, tmp_path):
    def poison(d, t):
        t["model.norm.weight"][0] = float("nan")

    r = megarl("convert", "hf-to-mcore", str(edited(tiny, tmp_path, poison)), str(tmp_path / "out"), timeout=300)
    one_line_error(r, "model.norm.weight: holds NaN or inf")
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_an_object(tiny, tmp_path):
    d = edited(tiny, tmp_path, lambda d, t: (d / "config.json").write_text(json.dumps([1, 2])))
    r = megarl("convert", "hf-to-mcore", str(d), str(tmp_path / "out"), timeout=300)
    one_line_error(r, "config.json: a model config is a JSON object")


def test_a_damaged_shard_is_named_by_mcore_to_hf(tiny, tmp_path):
    assert megarl("convert", "hf-to-mcore", str(tiny), str(tmp_path / "mcore"), timeout=300).returncode == 0
    shard = sorted((tmp_path / "mcore" / "model").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    r = megarl("convert", "mcore-to-hf", str(tmp_path / "mcore"), str(tmp_path / "back"), timeout=300)
    one_line_error(r, f"{shard.name}: damaged")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("content", [b"garbage", None], ids=["fake", "truncated"])
def test_a_fake_or_truncated_safetensors_file(tiny, tmp_path, content):
    d = tmp_path / "hf"
    shutil.copytree(tiny, d)
    (shard,) = d.glob("*.safetensors")
    shard.write_bytes(content if content is not None else shard.read_bytes()[:1000])
    r = megarl("convert", "hf-to-mcore", str(d), str(tmp_path / "out"), timeout=300)
    one_line_error(r, f"{shard}: not a readable safetensors file")


def test_data_inspect_with_a_model_refuses_what_train_refuses(tmp_path):
    """With --model, `data inspect` renders and tokenizes every prompt as training does: a prompt over
    --max-prompt-tokens is named by file and row there, not first at step 1 of a run."""
    assert megarl("data", "arithmetic", "--out", str(tmp_path), "--train", "4", "--test", "1").returncode == 0
    ok = megarl("data", "inspect", str(tmp_path / "train.parquet"), "--model", "tiny:qwen2", timeout=300)
    assert ok.returncode == 0 and "prompts: 4 rendered with tiny:qwen2's template, the longest" in ok.stdout
    r = megarl("data", "inspect", str(tmp_path / "train.parquet"), "--model", "tiny:qwen2",
               "--max-prompt-tokens", "5", timeout=300)
    one_line_error(r, "train.parquet row", "more than data.max_prompt_tokens=5")
