"""Packed micro-batches (train.packing) train exactly like right-padded ones: the same rewards, losses and gradient
norms to 1e-5 for a PPO-style loss, TRPA (whole groups per micro-batch) and A*-PO (one sample per prompt); a
packed run resumes exactly. (How much padding packing saves on long-tailed lengths: tests/unit/test_packing.py and
bench/packing.py; these prompts are all about the same length.)"""

from __future__ import annotations

import pytest

from tests.train.test_trainer import FAMILIES, make_data, run, same_metrics

# a budget that splits each step into several micro-batches, so packing places rows across them
SPLIT = "train.micro_batch_tokens=700"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))
PER_MICRO_BATCH = ("batch/",)  # padding and micro-batch counts differ; every loss/* metric must not


@pytest.mark.parametrize("family", ["grpo", "trpa", "astar_po"])
def test_packed_training_equals_padded(megatron_world, tmp_path, data_dir, family):
    overrides = [o.replace("VSTAR", str(data_dir / "vstar.parquet")) for o in FAMILIES[family]]
    if family == "astar_po":  # one sample per prompt: 4 samples of ~190 tokens, two to a micro-batch
        overrides += ["train.prompts_per_step=4", "train.micro_batch_tokens=400"]
    padded = run(tmp_path / "padded", data_dir, SPLIT, *overrides, "train.packing=false")
    packed = run(tmp_path / "packed", data_dir, SPLIT, *overrides, "train.packing=true")
    same_metrics(padded, packed, tol=1e-5, skip=PER_MICRO_BATCH)
    for p, q in zip(padded, packed):
        assert q["loss/total"] != 0.0 and q["optim/grad_norm"] > 0.0
        assert 0.0 <= q["batch/padding_fraction"] < 0.5 and q["batch/micro_batches"] >= 2


def test_packed_run_resumes_exactly(megatron_world, tmp_path, data_dir):
    straight = run(tmp_path / "a", data_dir, SPLIT, "train.steps=3")
    run(tmp_path / "b", data_dir, SPLIT, "train.steps=2")
    same_metrics(straight, run(tmp_path / "b", data_dir, SPLIT, "train.steps=3"))
