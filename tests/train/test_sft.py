"""`megarl sft` end to end on a tiny random model: the logged loss is the targets' negative log-likelihood as HF
transformers computes it, the exported model is the one that learned them, a stopped run resumes exactly, and rows
without a target are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megarl.config import load_config
from megarl.data.arith_dataset import write_arith_dataset
from megarl.data.kk_dataset import write_kk_dataset
from megarl.data.parquet import DataError, read_rows
from megarl.data.prompts import render_prompt
from megarl.metrics import read_metrics
from tests.train.test_trainer import same_metrics

BASE = ["model.hf_dir=tiny:qwen2", "train.prompts_per_step=6", "optim.lr=3e-3", "metrics.progress=false",
        "data.shuffle=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("kk")
    write_kk_dataset(d, 6, 0, [2], seed=7)
    return d / "train.parquet"


def sft(tmp: Path, data: Path, *overrides: str) -> list[dict]:
    from megarl.trainer import run_sft

    run_sft(load_config(None, [*BASE, f"run.dir={tmp}", f"data.train_files={data}", *overrides]))
    return read_metrics(tmp / "metrics.jsonl")


def hf_nll(model_dir: Path, data: Path) -> float:
    """Token-mean NLL of every row's target (then EOS) after its rendered prompt, by HF transformers (float64)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, n = 0.0, 0
    for row in read_rows(data):
        text = render_prompt(row["prompt"], tok, generation_prefix=row["extra_info"]["generation_prefix"])
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        target = tok(row["extra_info"]["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        picked = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]]
        total, n = total - float(picked.sum()), n + len(target)
    return total / n


def test_sft_loss_is_the_targets_nll_and_the_exported_model_learned_them(megatron_world, tmp_path, data):
    rows = sft(tmp_path, data, "train.steps=6")
    before = hf_nll(tmp_path / "init_model", data)
    # step 1's loss is computed on the initial weights, over every row (prompts_per_step = the dataset)
    assert rows[0]["loss/nll"] == pytest.approx(before, rel=1e-5)
    assert rows[0]["loss/total"] == pytest.approx(before, rel=1e-5)
    # each logged loss is the one before its update: the export (after the last) is below the last logged one
    after = hf_nll(tmp_path / "hf", data)
    assert after < rows[-1]["loss/nll"] < 0.9 * before, (before, rows[-1]["loss/nll"], after)
    assert rows[-1]["sft/epoch"] == pytest.approx(6.0)


def test_stopped_sft_resumes_to_the_uninterrupted_metrics(megatron_world, tmp_path, data):
    straight = sft(tmp_path / "a", data, "train.steps=4", "train.prompts_per_step=2", "checkpoint.export_hf=false")
    sft(tmp_path / "b", data, "train.steps=2", "train.prompts_per_step=2", "checkpoint.export_hf=false")
    resumed = sft(tmp_path / "b", data, "train.steps=4", "train.prompts_per_step=2", "checkpoint.export_hf=false")
    same_metrics(straight, resumed)


def test_a_row_without_a_target_is_named(megatron_world, tmp_path):
    write_arith_dataset(tmp_path / "d", 4, 1, 9, seed=0)
    with pytest.raises(DataError, match=r"train.parquet row 0: no extra_info.response"):
        sft(tmp_path / "r", tmp_path / "d" / "train.parquet", "train.steps=1")
