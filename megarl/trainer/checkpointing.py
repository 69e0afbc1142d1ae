"""Run checkpoints: ``run.dir/checkpoints/step_NNNNNN/``, written atomically, the last N kept.

    megarl.json, hf/        as a model checkpoint of ``megarl convert`` (so mcore-to-hf and eval read it)
    model/                  torch_dist: model + optimizer state (loadable at another TP/PP layout)
    trainer_state.json      step, prompt-stream position, LR scheduler state
    checksums.sha256        SHA-256 of every file above (megarl/checksums.py), checked before a resume
    rng/rank_R.pt           every rank's Python / NumPy / torch RNG states, as plain tensors and numbers: loaded
                            with ``torch.load(weights_only=True)``, so a planted file cannot run code

A checkpoint is written into ``.step_NNNNNN.tmp`` and renamed only after every rank has finished, so a run killed at
any moment leaves either a complete checkpoint or none; resume ignores (and removes) the temporary directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megarl.checksums import verify_checksums, write_checksums

_STEP = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path, verify: bool = False) -> Path | None:
    """The newest complete checkpoint of the run, or None. ``verify`` (the main rank, once, before a resume):
    the newest whose files match their checksums; a damaged newer one is named and renamed to
    ``.step_N.damaged`` (kept for inspection, no longer a checkpoint), so every rank's resume then finds the
    intact one without hashing again."""
    root = checkpoint_root(run_dir)
    done = sorted((p for p in root.glob("step_*") if _STEP.match(p.name) and (p / "trainer_state.json").is_file()),
                  key=lambda p: int(_STEP.match(p.name).group(1)), reverse=True)
    for p in done:
        if not verify:
            return p
        try:
            verify_checksums(p)
            return p
        except ValueError as e:
            print(f"checkpoint {p.name} is damaged and is set aside as .{p.name}.damaged: {e}", flush=True)
            shutil.rmtree(p.parent / f".{p.name}.damaged", ignore_errors=True)
            os.replace(p, p.parent / f".{p.name}.damaged")
    return None


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step:06d}"


def rng_state() -> dict:
    """The RNG states in types ``weights_only`` loading accepts (NumPy's key array becomes a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def load_rng(path: Path) -> dict:
    """An RNG file of ``rng_state()``; anything that is not plain data is refused, never executed."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # weights_only raises UnpicklingError (or others) on anything but plain data
        raise ValueError(f"{path}: refused to load: it is not the plain RNG state megarl writes ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}). A checkpoint directory must come from a source you "
                         f"trust; delete this checkpoint to resume from an earlier one.") from None


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str | Path, step: int, trainer_state: dict, write_model, keep_last: int) -> Path:
    """Collective. ``write_model(tmp_dir)`` writes megarl.json, hf/ and model/ (every rank calls it)."""
    final = step_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    write_model(tmp)
    torch.save(rng_state(), tmp / "rng" / f"rank_{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        write_checksums(tmp)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted((p for p in checkpoint_root(run_dir).glob("step_*") if _STEP.match(p.name)),
                     key=lambda p: int(_STEP.match(p.name).group(1)))
        for p in old[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def load_trainer_state(ckpt: Path) -> dict:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    rng = ckpt / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng.is_file():  # absent when resuming at a different world size: nothing to restore for new ranks
        set_rng_state(load_rng(rng))
    return state


def remove_partial(run_dir: str | Path) -> None:
    """Delete temporary checkpoint directories a killed run left (main rank, before anything is written)."""
    for tmp in checkpoint_root(run_dir).glob(".step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
