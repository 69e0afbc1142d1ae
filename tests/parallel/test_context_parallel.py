"""Context parallelism on CPU under torchrun (gloo), against HF transformers and against the CP=1 run.

Each worker (worker_cp.py) checks every tiny family's response log-probs, entropies and gradients against HF
(each sample alone) at its layout, right-padded and packed; this test then checks the layouts against CP=1:
log-probs within 1e-5,
gradients within the TP tolerance, greedy samples identical. `megarl train` at CP=2 logs the one-process run's
metrics, with the distributed optimizer sharded over the two context-parallel ranks, and resumes exactly from its
checkpoint.
"""

from __future__ import annotations

import glob

import pytest
import torch

from megarl.metrics import read_metrics
from tests.parallel.launch import torchrun
from tests.train.test_trainer import BASE, make_data, run, same_metrics
from tests.train.test_trainer import FAMILIES as FAMILY_OVERRIDES

pytestmark = pytest.mark.dist
FAMILIES = ("llama", "mistral", "qwen2", "qwen2_untied", "qwen3")


def load(out_dir, family):
    merged = {"grads": {}, "grads packed": {}}
    for f in sorted(glob.glob(f"{out_dir}/{family}_stage*.pt")):
        r = torch.load(f)
        for k in ("grads", "grads packed"):
            merged[k].update(r.pop(k))
        merged.update(r)  # log-probs and samples: every stage holds them
    return merged


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp1")
    log = torchrun("tests/parallel/worker_cp.py", 1, "--out", str(out))
    assert log.count("gradients match HF") == len(FAMILIES)
    return out


# CP2 and CP2xPP2 (the pipeline's activation shapes divided by cp) in the default run; with -m slow TP2xCP2, and TP2
# and TP2xCP2 with sequence parallelism (micro-batches padded to a multiple of tp; greedy samples with it switched
# off; the default run covers SP in test_parallel_parity.py and, generation included, test_moe_parallel.py)
@pytest.mark.parametrize("tp,cp,pp,sp", [(1, 2, 1, False), pytest.param(2, 2, 1, False, marks=pytest.mark.slow),
                                         (1, 2, 2, False), pytest.param(2, 1, 1, True, marks=pytest.mark.slow),
                                         pytest.param(2, 2, 1, True, marks=pytest.mark.slow)],
                         ids=["cp2", "tp2xcp2", "cp2xpp2", "tp2-sp", "tp2xcp2-sp"])
def test_layout_matches_cp1_and_hf(reference, tmp_path, tp, cp, pp, sp):
    log = torchrun("tests/parallel/worker_cp.py", tp * cp * pp, "--tp", str(tp), "--cp", str(cp), "--pp", str(pp),
                   "--out", str(tmp_path), *(["--sp"] if sp else []), timeout=900)
    assert log.count("gradients match HF") == len(FAMILIES) * tp * cp * pp  # every rank checked its copy
    for family in FAMILIES:
        want, got = load(reference, family), load(tmp_path, family)
        assert got["greedy"] == want["greedy"], family
        paths = [k for k in want if k.startswith("logprobs")]
        assert len(paths) == 4 and set(paths) <= set(got)  # fused / logits, padded / packed
        for k in paths:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=lambda m: f"{family} {k}: {m}")
        for k in ("grads", "grads packed"):
            assert set(got[k]) == set(want[k])
            for name, g in want[k].items():
                torch.testing.assert_close(got[k][name], g, rtol=1e-5, atol=5e-7,
                                           msg=lambda m: f"{family} {k} {name}: {m}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_training_at_cp2_matches_one_rank_and_resumes(megatron_world, tmp_path, data_dir):
    """Step 1 at CP=2, with the distributed optimizer sharding its state over the two context-parallel ranks, logs
    the one-process run's metrics; steps 2-3 resumed from its checkpoint in one process equal the uninterrupted
    run (step 3 sees the step-2 update, made with the restored Adam moments)."""
    common = [f"data.train_files={data_dir / 'train.parquet'}", "optim.distributed=true"]  # packed (the default)
    reference = run(tmp_path / "one", data_dir, *common[1:], "train.steps=3")
    log = torchrun("megarl.cli", 2, "train", *BASE, f"run.dir={tmp_path / 'cp2'}", *common, "parallel.cp=2",
                   "train.steps=1", timeout=900)
    assert "layout: tp=1 pp=1 cp=2 dp=1" in log
    assert [m["step"] for m in read_metrics(tmp_path / "cp2" / "metrics.jsonl")] == [1]
    resumed = run(tmp_path / "cp2", data_dir, *common[1:], "train.steps=3")
    # batch/*: each packed segment is padded to a multiple of 2 cp at CP=2
    same_metrics(reference[:1], resumed[:1], tol=1e-4, skip=("batch/",))
    same_metrics(reference[1:], resumed[1:], tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_OVERRIDES))
def test_every_family_at_cp2_matches_one_rank(megatron_world, tmp_path, data_dir, family):
    """Each algorithm family trained at CP=2 (selective recompute for the attention path's collectives inside
    megatron-core's checkpoint) logs the one-rank run's metrics (1e-4): sequence- and group-level losses (GSPO,
    TRPA's pairs, KL-Cov's token selection) see whole sequences."""
    overrides = [o.replace("VSTAR", str(data_dir / "vstar.parquet")) for o in FAMILY_OVERRIDES[family]]
    reference = run(tmp_path / "one", data_dir, *overrides)
    torchrun("megarl.cli", 2, "train", *BASE, f"run.dir={tmp_path / 'cp2'}",
             f"data.train_files={data_dir / 'train.parquet'}", *overrides, "parallel.cp=2", "model.recompute=selective",
             timeout=900)
    same_metrics(reference, read_metrics(tmp_path / "cp2" / "metrics.jsonl"), tol=1e-4, skip=("batch/",))
