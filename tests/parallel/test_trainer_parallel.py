"""`megarl train` under torchrun against the same run at TP=1 in one process: TP=2 (the tiny model's 4 heads / 2
KV groups split over two ranks), PP=2 (2 layers per stage), and data parallel 2 (one prompt per rank, gradients
summed by Megatron DDP; also with the distributed optimizer) log the same metrics up to floating-point summation
order."""

from __future__ import annotations


import pytest

from megarl.metrics import read_metrics
from tests.parallel.launch import torchrun, torchrun_nodes
from tests.train.test_trainer import BASE, FAMILIES, make_data, run, same_metrics

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


LAYOUTS = {  # id: (overrides of the 2-rank run, loss); every other family at TP2 in the next test
    "pp2-grpo": (["parallel.pp=2"], "grpo"),
    "dp2-grpo": ([], "grpo"),
    "dp2-distopt-grpo": (["optim.distributed=true"], "grpo"),  # optimizer state sharded over DP
}
SLOW_LAYOUTS = ("dp2-grpo",)  # DP2 runs in the default suite with the distributed optimizer


@pytest.mark.parametrize("layout", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_LAYOUTS else k
                                    for k in sorted(LAYOUTS)])
def test_trainer_matches_tp1(megatron_world, tmp_path, data_dir, layout):
    overrides, loss = LAYOUTS[layout]
    common = [f"data.train_files={data_dir / 'train.parquet'}", f"algo.loss={loss}"]
    reference = run(tmp_path / "tp1", data_dir, *common[1:])
    torchrun("megarl.cli", 2, "train", *BASE, f"run.dir={tmp_path / 'par'}", *common, *overrides, timeout=900)
    par = read_metrics(tmp_path / "par" / "metrics.jsonl")
    # optim/grad_norm included: it once came out ~0.77x at TP=2 (sharded weights loaded into a model built without
    # megatron-core's init path lacked their TP attributes, so the norm skipped TP rank 1's shards)
    # batch/*: each data-parallel rank packs its own samples, so padding depends on the layout. loss/* included:
    # every one is a share of the mini-batch's value, summed (it was once a mean over micro-batches: loss/kl halved
    # at DP=2)
    same_metrics(reference, par, tol=1e-4, skip=("batch/",) if "dp2" in layout else ())


# in the default run, the families whose code paths differ most (pair-wise TRPA with whole groups, V* from a file);
# GRPO runs at every layout above; the others with -m slow (the losses are pure per-token functions of gathered
# log-probs, which the TP=2 runs above already check; KL-Cov's token selection is over data-parallel ranks, not TP)
AT_TP2 = ("trpa", "astar_po")


@pytest.mark.parametrize("family", [f if f in AT_TP2 else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(FAMILIES)])
def test_every_family_at_tp2_matches_tp1(megatron_world, tmp_path, data_dir, family):
    """Each algorithm family of the TP=1 trainer tests, trained at TP=2, logs the TP=1 metrics (losses, grad norms,
    KL, clip fractions, rewards of the step-2 samples) to 1e-4."""
    overrides = [o.replace("VSTAR", str(data_dir / "vstar.parquet")) for o in FAMILIES[family]]
    reference = run(tmp_path / "tp1", data_dir, *overrides)
    torchrun("megarl.cli", 2, "train", *BASE, f"run.dir={tmp_path / 'tp2'}",
             f"data.train_files={data_dir / 'train.parquet'}", *overrides, "parallel.tp=2", timeout=900)
    same_metrics(reference, read_metrics(tmp_path / "tp2" / "metrics.jsonl"), tol=1e-4)


def test_two_nodes_training_at_tp2_matches_tp1(megatron_world, tmp_path, data_dir):
    """The README's multi-node launch as two torchrun "nodes" on this machine (--nnodes 2 over localhost), one rank
    each, forming one TP=2 group across them: `megarl train` logs the TP=1 metrics."""
    common = [f"data.train_files={data_dir / 'train.parquet'}", "algo.loss=grpo"]
    reference = run(tmp_path / "tp1", data_dir, *common[1:])
    torchrun_nodes("megarl.cli", 2, "train", *BASE, f"run.dir={tmp_path / 'nodes'}", *common, "parallel.tp=2",
                   timeout=900)
    same_metrics(reference, read_metrics(tmp_path / "nodes" / "metrics.jsonl"), tol=1e-4)


def test_vstar_under_data_parallel_matches_one_rank(megatron_world, tmp_path, data_dir):
    """A*-PO stage 1 at DP=2 (replicas split each chunk of prompts) writes what one rank writes."""
    from megarl.config import load_config
    from megarl.data.parquet import read_rows
    from megarl.trainer import run_vstar

    args = ["model.hf_dir=tiny:qwen2", "rollout.max_tokens=6", "reward.num_workers=0", "metrics.progress=false",
            "algo.vstar_samples=2", "reward.custom_fn=tests.train.rewards:text_hash_reward",
            f"data.train_files={data_dir / 'train.parquet'}"]
    (one,) = run_vstar(load_config(None, [*args, f"run.dir={tmp_path / 'one'}"]), chunk=5)
    torchrun("megarl.cli", 2, "vstar", "--chunk", "5", *args, f"run.dir={tmp_path / 'dp2'}", timeout=600)
    two = read_rows(tmp_path / "dp2" / "vstar" / "train.parquet")
    assert [r["extra_info"] for r in two] == [r["extra_info"] for r in read_rows(one)]


@pytest.mark.slow  # the default run resumes a CP=2 run's sharded optimizer in one process (test_context_parallel)
def test_distributed_optimizer_state_resumes_at_another_layout(megatron_world, tmp_path, data_dir):
    """Step 1 at DP=2 with the optimizer state sharded over the two ranks, steps 2-3 resumed in one process: the
    metrics equal an uninterrupted one-process run (step 3 sees the step-2 update, made with the restored Adam
    moments)."""
    common = [f"data.train_files={data_dir / 'train.parquet'}", "optim.distributed=true", "train.steps=3"]
    reference = run(tmp_path / "one", data_dir, *common[1:])
    torchrun("megarl.cli", 2, "train", *BASE, f"run.dir={tmp_path / 'moved'}", *common[:-1], "train.steps=1",
             timeout=900)
    moved = run(tmp_path / "moved", data_dir, *common[1:])
    same_metrics(reference, moved, tol=1e-4, skip=("batch/",))
