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

import json
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megarl.backends.megatron.model import unwrap
from megarl.convert.arch import ModelArch, read_arch

FORMAT = "megarl-mcore-model-v1"


def save_model(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Write this rank's shards of ``model`` into ``ckpt_dir`` (collective: every rank calls it)."""
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
    dist_checkpointing.save({"model": msd, "optimizer": optimizer.sharded_state_dict(msd)}, str(ckpt_dir))


def load_training_state(model: torch.nn.Module, optimizer, ckpt_dir: Path) -> None:
    """Restore what ``save_training_state`` wrote, at the same or another TP/PP layout (the non-distributed
    optimizer's state is resharded like the weights). Collective."""
    gpt = unwrap(model)
    msd = gpt.sharded_state_dict()
    osd = optimizer.sharded_state_dict(msd, is_loading=True)
    state = dist_checkpointing.load({"model": msd, "optimizer": osd}, str(ckpt_dir))
    gpt.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])  # bf16: also restores the fp32 main weights


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
    return read_arch(meta["hf_config"], str(meta_path)), getattr(torch, meta["dtype"]), weights
