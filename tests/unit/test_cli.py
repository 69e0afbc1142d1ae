"""The ``megarl`` command as a user runs it: help on every subcommand, ``env``, one-line errors, the smoke check
(the demo's training job is in tests/train/test_demo.py)."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from megarl.cli import build_parser
from tests.cli import megarl

pytestmark = pytest.mark.cli  # every test here runs a subprocess


def all_commands():
    """Every (sub)command path of the parser, so a new subcommand is covered automatically."""
    out, stack = [], [((), build_parser())]
    while stack:
        path, parser = stack.pop()
        out.append(path)
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                stack += [((*path, name), sub) for name, sub in action.choices.items()]
    return out


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "megarl")
def test_help_on_every_command(path):
    r = megarl(*path, "--help", timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: megarl"), r.stderr
    assert len(r.stdout.splitlines()) > 3


def test_env_reports_versions_device_backend_and_spec():
    r = megarl("env", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    # against the installed distributions' own metadata, not a pinned number (GPU images carry other torches)
    assert info["packages"]["megatron-core"] == md.version("megatron-core")
    assert info["packages"]["torch"] == md.version("torch") and info["python"] == platform.python_version()
    assert info["backend"] in ("gloo", "nccl") and info["layer_spec"] in ("local", "transformer_engine")
    text = megarl("env", timeout=120).stdout
    rows = dict(line.split(None, 1) for line in text.splitlines() if line.startswith(("megatron-core ", "transformer-")))
    assert rows["megatron-core"] == md.version("megatron-core") and "dist backend" in text
    assert rows["transformer-engine"].strip() in ("not installed", info["packages"]["transformer-engine"])


def test_env_exits_nonzero_when_a_required_package_is_missing(monkeypatch):
    import megarl.envinfo as envinfo

    real = envinfo._version
    monkeypatch.setattr(envinfo, "_version", lambda d: None if d == "megatron-core" else real(d))
    info = envinfo.collect()
    assert info["missing"] == ["megatron-core"]
    assert "error: required package 'megatron-core' is not installed" in envinfo.render(info)


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("megarl: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in err[0], err[0]


def test_bad_inputs_get_one_line(tmp_path):
    one_line_error(megarl("convert", "inspect", str(tmp_path / "missing")), "no such directory")
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    one_line_error(megarl("convert", "inspect", str(tmp_path)), "GPT2LMHeadModel", "LlamaForCausalLM, ")
    from megarl.convert.tiny import tiny_hf_config

    tiny_hf_config("qwen3").save_pretrained(tmp_path)
    ok = megarl("convert", "inspect", str(tmp_path), "--tp", "2", "--pp", "4")
    assert ok.returncode == 0 and "qk_norm             True" in ok.stdout
    one_line_error(megarl("convert", "inspect", str(tmp_path), "--tp", "4"), "parallel.tp=4", "valid values: 1, 2.")
    one_line_error(megarl("convert", "inspect", str(tmp_path), "--tp", "2", "--pp", "2", "--world-size", "6"),
                   "world size 6 is not divisible")


def test_smoke_generates_with_megatron_and_matches_hf(megarl_cache):
    r = megarl("smoke", "--max-new-tokens", "12", env={"MEGARL_CACHE": str(megarl_cache)}, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("HF transformers greedy decoding: identical") == 2
    assert "The capital of France is Paris." in r.stdout and r.stdout.rstrip().endswith("smoke ok")


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parents[2] / "tools").glob("*.py")))
def test_tools_wrappers_forward_to_the_cli(script):
    tool = Path(__file__).parents[2] / "tools" / script
    r = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: megarl convert"), r.stderr
