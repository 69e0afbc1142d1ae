"""Hugging Face checkpoint files: lazy safetensors reading, sharded writing, side files, atomic output dirs.

Reading is per tensor (``safe_open`` memory-maps the file and materialises only what is asked for) and writing
flushes a shard as soon as it reaches ``max_shard_bytes``: a conversion holds at most one shard of HF tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Files of an HF model directory other than the weights; copied through conversions unchanged.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
              "chat_template.jinja", "chat_template.json")
INDEX = "model.safetensors.index.json"


def _open_safetensors(path: Path):
    """``safe_open`` with a truncated, fake or foreign file reported as one line naming it."""
    try:
        return safe_open(str(path), "pt")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a bad header
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]}); the "
                         f"download or copy is incomplete or the file is something else.") from None


class HFReader:
    """Tensors of an HF directory by name, from ``model.safetensors`` or a sharded index."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{hf_dir}: no such directory (expected a Hugging Face model directory).")
        index, single = self.dir / INDEX, self.dir / "model.safetensors"
        if index.is_file():
            try:
                self.file_of = {k: self.dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index}: not a safetensors index (a JSON object with a 'weight_map'): "
                                 f"{type(e).__name__}: {e}.") from None
        elif single.is_file():
            with _open_safetensors(single) as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or {INDEX}; megarl reads safetensors "
                                    f"checkpoints (convert .bin files with transformers' save_pretrained first).")
        missing = sorted({str(p) for p in self.file_of.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{hf_dir}: {INDEX} names missing file(s): {', '.join(missing)}.")
        self._open: tuple[Path, object] | None = None

    def names(self) -> list[str]:
        return list(self.file_of)

    def _handle(self, path: Path):
        # One file mapped at a time: a mapped shard's touched pages count as resident memory, so keeping every
        # shard open would hold the whole checkpoint on top of the model being filled.
        if self._open is None or self._open[0] != path:
            self._open = (path, _open_safetensors(path))
        return self._open[1]

    def close(self) -> None:
        self._open = None

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise KeyError(f"{self.dir}: tensor '{name}' is missing from the checkpoint; its config.json and "
                           f"weights do not describe the same model.")
        return self._handle(self.file_of[name]).get_tensor(name)

    def dtypes(self) -> set[torch.dtype]:
        known = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
        out = set()
        for name, path in self.file_of.items():
            code = self._handle(path).get_slice(name).get_dtype()
            if code not in known:
                raise ValueError(f"{self.dir}: tensor '{name}' has dtype {code}; megarl converts floating-point "
                                 f"checkpoints ({', '.join(known)}), not quantized ones.")
            out.add(known[code])
        return out


class ShardedWriter:
    """Write (name, tensor) pairs into ``model-0000i-of-0000N.safetensors`` shards plus the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 << 30):
        self.dir, self.max = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in keys for _, keys in self.files):
            raise ValueError(f"tensor '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp = f"shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.dir / tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Flush, give the shards their final names and write the index."""
        if self.pending:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp, self.dir / final)
            weight_map.update({k: final for k in keys})
        (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total_bytes},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in ``src``."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a path that is a file, or a non-empty directory unless ``overwrite`` (checked before slow work)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; pass --overwrite to replace it.")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; rename it to ``out`` only if the body succeeds.

    A killed or failed conversion leaves a hidden ``.NAME.tmp-HOST-PID`` directory, never something at ``out`` that
    looks complete. An existing non-empty ``out`` is refused unless ``overwrite``.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{_host()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock`` on ``path``) held for the body. Processes that build the same
    directory -- the first rank of every node when the directory is on a shared filesystem, or two jobs sharing a
    cache -- take turns, and the later ones find the work done instead of renaming over it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _host() -> str:
    """This node's name, made safe for a file name (no '-': the PID follows the last one)."""
    import socket

    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def remove_stale_tmp(out: Path) -> None:
    """Delete ``.NAME.tmp-HOST-PID`` directories that killed runs of THIS node left beside ``out`` (their process
    is gone). Another node's are left alone: its PIDs mean nothing here, and on a shared filesystem its writer may
    still be running."""
    for tmp in out.parent.glob(f".{out.name}.tmp-{_host()}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)
