"""HF <-> Megatron conversion: bit-exact round trips, logit probes at TP/PP layouts, streaming export against
the on-disk files, and the bad inputs a user meets. SmolLM2-135M is the real-model case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megarl.convert.tiny import TINY_FAMILIES, tiny_hf_model
from tests.cli import megarl
from tests.parallel.launch import torchrun

MODELS = (*TINY_FAMILIES, "llama_bf16")
MOE = ("qwen3_moe", "mixtral")


def read_all(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, megatron_world):
    """Every tiny family (and a bf16 Llama) saved by transformers, converted to Megatron and back, in-process."""
    from megarl.backends.megatron.convert import hf_to_mcore, mcore_to_hf

    root = tmp_path_factory.mktemp("convert")
    for name in MODELS:
        model = tiny_hf_model(name.removesuffix("_bf16"), seed=11)
        if name.endswith("_bf16"):
            model = model.to(torch.bfloat16)
        model.save_pretrained(root / name / "hf")
        hf_to_mcore(str(root / name / "hf"), str(root / name / "mcore"), log=lambda *a: None)
        mcore_to_hf(str(root / name / "mcore"), str(root / name / "back"), log=lambda *a: None)
    return root


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_is_bit_exact_and_loads_in_transformers(converted, name):
    from transformers import AutoModelForCausalLM

    src, back = read_all(converted / name / "hf"), read_all(converted / name / "back")
    assert set(src) == set(back)
    for k, t in src.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert (converted / name / "back" / "config.json").read_bytes() == \
        (converted / name / "hf" / "config.json").read_bytes()
    index = json.loads((converted / name / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src)
    ids = torch.arange(3, 40).unsqueeze(0)
    a = AutoModelForCausalLM.from_pretrained(converted / name / "hf").eval()
    b = AutoModelForCausalLM.from_pretrained(converted / name / "back").eval()
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_shards_respect_the_size_cap(converted, tmp_path):
    from megarl.backends.megatron.convert import mcore_to_hf

    stats = mcore_to_hf(str(converted / "llama" / "mcore"), str(tmp_path / "out"), max_shard_bytes=100_000,
                        log=lambda *a: None)
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert stats["shards"] == len(files) > 3
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    biggest = max(t.numel() * t.element_size() for t in read_all(tmp_path / "out").values())
    assert all(f.stat().st_size <= 100_000 + biggest + 10_000 for f in files)
    assert torch.equal(read_all(tmp_path / "out")["model.norm.weight"],
                       read_all(converted / "llama" / "hf")["model.norm.weight"])


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)], ids=["tp1", "tp2", "pp2", "tp2xpp2"])
def test_verify_and_streaming_export_at_every_layout(converted, tp, pp):
    # the MoE families at TP1 and PP2 here; with experts split (EP2, TP2xEP2) below
    models = MODELS if (tp, pp) in ((1, 1), (1, 2)) else [m for m in MODELS if m not in MOE]
    out = torchrun("tests/parallel/worker_convert.py", tp * pp, "--tp", str(tp), "--pp", str(pp),
                   "--root", str(converted), "--families", ",".join(models))
    assert out.count("verify + streaming export ok") == len(models)
    assert out.count("max |logit diff| vs HF") == len(models)


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 2), (2, 1, 2), pytest.param(1, 2, 2, marks=pytest.mark.slow)],
                         ids=["ep2", "tp2xep2", "pp2xep2"])
def test_moe_verify_and_streaming_export_at_expert_parallel_layouts(converted, tp, pp, ep):
    """Experts split over EP ranks (and over TP, and pipeline stages): logits equal HF's, and every rank's export
    gathers every expert back bit-exactly under its checkpoint name."""
    out = torchrun("tests/parallel/worker_convert.py", tp * pp * ep, "--tp", str(tp), "--pp", str(pp), "--ep",
                   str(ep), "--root", str(converted), "--families", ",".join(MOE))
    assert out.count("verify + streaming export ok") == len(MOE)
    assert out.count(f"ep={ep}: 24 probe tokens, max |logit diff| vs HF") == len(MOE)


def test_cli_verify_under_torchrun_and_its_failure_exit(converted):
    d = converted / "qwen3"
    out = torchrun("megarl.cli", 2, "convert", "verify", str(d / "hf"), str(d / "mcore"), "--tp", "2")
    assert "verify tp=2 pp=1" in out
    d = converted / "mixtral"
    out = torchrun("megarl.cli", 2, "convert", "verify", str(d / "hf"), str(d / "mcore"), "--ep", "2")
    assert "verify tp=1 pp=1 ep=2" in out
    r = megarl("convert", "verify", str(d / "hf"), str(d / "mcore"), "--tol", "1e-12")
    assert r.returncode == 2 and "exceeds the tolerance 1e-12" in r.stderr


def test_bad_inputs_are_one_line_errors(converted, tmp_path):
    def one_line(r, *needles):
        lines = [x for x in r.stderr.splitlines() if x.startswith("megarl: error:")]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        for n in needles:
            assert n in lines[0], lines[0]

    one_line(megarl("convert", "hf-to-mcore", str(tmp_path / "nope"), str(tmp_path / "o")), "no such directory")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_bytes((converted / "llama" / "hf" / "config.json").read_bytes())
    one_line(megarl("convert", "hf-to-mcore", str(tmp_path / "noweights"), str(tmp_path / "o")), "no model.safetensors")
    bad = tmp_path / "badshape"
    bad.mkdir()
    cfg = json.loads((converted / "llama" / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((converted / "llama" / "hf" / "model.safetensors").read_bytes())
    one_line(megarl("convert", "hf-to-mcore", str(bad), str(tmp_path / "o")),
             "model.layers.0.mlp.gate_proj.weight", "(128, 64)", "(96, 64)")
    assert not (tmp_path / "o").exists()
    cfg["architectures"] = ["FalconForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    one_line(megarl("convert", "hf-to-mcore", str(bad), str(tmp_path / "o")), "FalconForCausalLM", "Qwen2ForCausalLM")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    one_line(megarl("convert", "mcore-to-hf", str(converted / "llama" / "mcore"), str(taken)), "--overwrite")
    assert (taken / "keep.txt").read_text() == "mine"
    ok = megarl("convert", "mcore-to-hf", str(converted / "llama" / "mcore"), str(taken), "--overwrite")
    assert ok.returncode == 0 and not (taken / "keep.txt").exists() and (taken / "config.json").is_file()
    one_line(megarl("convert", "mcore-to-hf", str(converted / "llama" / "hf"), str(tmp_path / "o2")),
             "not a megarl Megatron checkpoint")


def test_smollm2_round_trip_bit_exact_and_verified(smollm2_dir, tmp_path):
    r = megarl("convert", "hf-to-mcore", str(smollm2_dir), str(tmp_path / "mcore"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "peak RSS" in r.stdout
    r = megarl("convert", "mcore-to-hf", str(tmp_path / "mcore"), str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr[-2000:]
    src, back = load_file(smollm2_dir / "model.safetensors"), read_all(tmp_path / "back")
    assert set(src) == set(back) and len(src) == 272
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in src.items())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (smollm2_dir / name).read_bytes()
    for tp, pp in ((1, 1), (1, 2)):
        out = torchrun("megarl.cli", tp * pp, "convert", "verify", str(smollm2_dir), str(tmp_path / "mcore"),
                       "--tp", str(tp), "--pp", str(pp))
        diff = float(out.split("max |logit diff| vs HF = ")[1].split()[0])
        assert diff < 1e-4


@pytest.mark.slow
def test_smollm2_verified_at_tp3_pp2(smollm2_dir, tmp_path):
    assert megarl("convert", "hf-to-mcore", str(smollm2_dir), str(tmp_path / "mcore")).returncode == 0
    out = torchrun("megarl.cli", 6, "convert", "verify", str(smollm2_dir), str(tmp_path / "mcore"),
                   "--tp", "3", "--pp", "2")
    assert float(out.split("max |logit diff| vs HF = ")[1].split()[0]) < 1e-4


def test_killed_conversion_leaves_nothing_that_looks_complete(smollm2_dir, tmp_path):
    out = tmp_path / "mcore"
    proc = subprocess.Popen([sys.executable, "-m", "megarl.cli", "convert", "hf-to-mcore", str(smollm2_dir), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    from megarl.convert.hf_io import _host

    tmp = tmp_path / f".mcore.tmp-{_host()}-{proc.pid}"
    while time.time() < deadline and not (tmp / "model").exists():
        time.sleep(0.05)
    assert (tmp / "model").exists(), "the conversion never reached its checkpoint write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    r = megarl("convert", "hf-to-mcore", str(smollm2_dir), str(out))  # a rerun succeeds and sweeps the leftovers
    assert r.returncode == 0 and (out / "model" / "metadata.json").is_file()
    assert not list(tmp_path.glob(".mcore.tmp-*"))
