"""Megatron distributed checkpoints (torch_dist) of a model: save at one TP/PP layout, load at any other.

megatron-core's ``dist_checkpointing`` stores every tensor with its global shape and each rank's slice, so a
checkpoint written at TP1/PP1 loads at TP2xPP2 (and back) by resharding on load. The directory layout megarl
writes for a model checkpoint:

    DIR/megarl.json   format tag, source, dtype, the ModelArch's HF config
    DIR/hf/           config.json, generation config and tokenizer files of the source model
    DIR/model/        the torch_dist checkpoint (metadata.json, *.distcp, common.pt)
    DIR/eval_model/   schedule-free training checkpoints only: the averaged weights x, which megarl.json names as
                      the weights to serve (model/ holds y and the optimizer state, for resuming)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megarl.backends.megatron.model import unwrap
from megarl.convert.arch import ModelArch, read_arch
from megarl.checksums import verify_checksums

FORMAT = "megarl-mcore-model-v1"
# the distributed optimizer's state in the canonical per-parameter layout (gathered on DP rank 0 to save), so a run
# resumes at any DP/TP/PP layout; its default (per-rank flattened ranges) is refused by megatron-core 0.16's own
# dist_checkpointing ("ShardedTensor.flattened_range is not supported")
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _die_with_parent(sig: int = 15) -> None:
    """Runs first in a helper process: Linux sends it ``sig`` (default SIGTERM) when the thread that started it
    ends, so a helper never outlives a killed trainer."""
    import ctypes

    ctypes.CDLL(None).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG


_saving = False  # True while this process is inside save_model / save_training_state
_forking_pid: int | None = None
_fork_hook_installed = False


def _remember_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _forked_writer_dies_with_trainer() -> None:
    """After a fork inside a save (megatron-core forks one writer per bucket of a torch_dist save): the writer gets
    SIGKILL when the trainer dies. Otherwise a writer whose trainer was SIGKILLed mid-save blocks forever on the
    queues it shares with the dead parent. SIGKILL, not SIGTERM: a fork inherits the trainer's signal handlers, and
    the half-written checkpoint it was writing is discarded on resume anyway. A trainer that died between the fork
    and the prctl is caught by the parent-pid check."""
    if _saving and sys.platform.startswith("linux"):
        _die_with_parent(signal.SIGKILL)
        if os.getppid() != _forking_pid:
            os._exit(1)


@contextlib.contextmanager
def _orphan_safe_save():
    """Scope of one dist_checkpointing.save: its helper processes (the results-queue manager and the forked
    writers) die with the trainer. Only forks made inside the scope are affected."""
    global _saving, _fork_hook_installed
    _orphan_safe_results_queue()
    if not _fork_hook_installed:
        os.register_at_fork(before=_remember_forking_pid, after_in_child=_forked_writer_dies_with_trainer)
        _fork_hook_installed = True
    _saving = True
    try:
        yield
    finally:
        _saving = False


def _orphan_safe_results_queue() -> None:
    """megatron-core's torch_dist writer collects results through a queue served by a ``multiprocessing.Manager``
    process it spawns on the first save and stops at a normal exit. A killed trainer (SIGKILL, OOM killer) never
    stops it: the manager then sleeps forever, holding a few hundred MB, one per killed run. So the trainer starts
    that manager itself, set to die with its parent, and hands megatron-core its queue."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None or not sys.platform.startswith("linux"):
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_die_with_parent)
    filesystem_async._results_queue = manager.Queue()
    filesystem_async._results_manager = manager  # kept alive as long as the queue is


def save_model(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Write this rank's shards of ``model`` into ``ckpt_dir`` (collective: every rank calls it)."""
    with _orphan_safe_save():
        dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(ckpt_dir))


def load_model(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Fill ``model`` (built at any TP/PP layout) from a torch_dist checkpoint, in place."""
    gpt = unwrap(model)
    state = dist_checkpointing.load(gpt.sharded_state_dict(), str(ckpt_dir))
    gpt.load_state_dict(state, strict=False)
    missing = [n for n, p in gpt.named_parameters() if n not in state]
    if missing:
        raise ValueError(f"{ckpt_dir}: the checkpoint has no tensor for {missing[:3]}; it was written for another "
                         f"architecture.")


def save_training_state(model: torch.nn.Module, optimizer, ckpt_dir: Path) -> None:
    """Model and optimizer state (Adam moments or schedule-free z / second moments, step counters) into one
    torch_dist checkpoint. Collective. The model part alone is what ``load_model`` reads, so a training checkpoint
    is also a model checkpoint for ``mcore-to-hf`` and ``megarl eval``."""
    msd = unwrap(model).sharded_state_dict()
    osd = optimizer.sharded_state_dict(msd, metadata=OPTIMIZER_METADATA)
    with _orphan_safe_save():
        dist_checkpointing.save({"model": msd, "optimizer": osd}, str(ckpt_dir))


def load_training_state(model: torch.nn.Module, optimizer, ckpt_dir: Path) -> None:
    """Restore what ``save_training_state`` wrote, at the same or another TP/PP/DP layout (optimizer state, also
    the distributed optimizer's, is resharded like the weights). Collective."""
    gpt = unwrap(model)
    msd = gpt.sharded_state_dict()
    _make_distributed_optimizer_loadable(optimizer)
    osd = optimizer.sharded_state_dict(msd, is_loading=True, metadata=OPTIMIZER_METADATA)
    state = dist_checkpointing.load({"model": msd, "optimizer": osd}, str(ckpt_dir))
    gpt.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])  # bf16: also restores the fp32 main weights
    _unshare_steps(optimizer)


def _make_distributed_optimizer_loadable(optimizer) -> None:
    """Make megatron-core 0.16's DistributedOptimizer loadable without apex/TE (torch AdamW inside), where it has
    two faults: its loading template comes from ``state_dict()``, which asserts on a ``step`` in every parameter's
    state -- absent until the first step, so a fresh run cannot resume; and its loader then copies every key of a
    parameter's state from the checkpoint, where ``step`` (kept in the param groups instead) is not -- a KeyError.
    Here fresh state gets zero moments and step 0 (the checkpoint overwrites all three), and the copy skips
    ``step``."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    if not getattr(cls, "_megarl_step_safe", False):
        copy_states = cls._set_main_param_and_optimizer_states

        def copy_all_but_step(self, model_param, tensors):
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                copy_states(self, model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        cls._set_main_param_and_optimizer_states = copy_all_but_step
        cls._megarl_step_safe = True
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, cls) and sub.optimizer is not None:
            sub.init_state_fn(sub.optimizer, sub.config)
            for state in sub.optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))


def _unshare_steps(optimizer) -> None:
    """The same DistributedOptimizer loader (no apex/TE) puts one ``step`` tensor into every parameter's state;
    torch AdamW increments it in place once per parameter, so the next step would run at step 1 + n_params (a
    wrong bias correction). Give each parameter its own copy."""
    from megatron.core.optimizer import distrib_optimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, distrib_optimizer.DistributedOptimizer) and sub.optimizer is not None:
            for state in sub.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def write_meta(out: Path, arch: ModelArch, dtype: torch.dtype, source: str, weights: str = "model") -> None:
    """``weights``: the subdirectory whose model tensors conversion and evaluation read."""
    meta = {"format": FORMAT, "source": source, "dtype": str(dtype).removeprefix("torch."),
            "hf_config": arch.hf_config, "weights": weights}
    (out / "megarl.json").write_text(json.dumps(meta, indent=2))


def read_meta(mcore_dir: str | Path) -> tuple[ModelArch, torch.dtype, Path]:
    """(arch, stored dtype, path of the torch_dist directory to serve) of a megarl Megatron checkpoint directory."""
    d = Path(mcore_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{mcore_dir}: no such directory (expected `megarl convert hf-to-mcore` output).")
    meta_path = d / "megarl.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    weights = d / meta.get("weights", "model")
    if not meta or not (weights / "metadata.json").is_file():
        raise FileNotFoundError(f"{mcore_dir}: not a megarl Megatron checkpoint (megarl.json and model/metadata.json "
                                f"are required); make one with `megarl convert hf-to-mcore HF_DIR {mcore_dir}`.")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}.")
    verify_checksums(d)  # a damaged or incomplete copy is named here, not found as wrong values later
    return read_arch(meta["hf_config"], str(meta_path)), getattr(torch, meta["dtype"]), weights
