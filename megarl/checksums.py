"""Checksums of every file of a checkpoint directory, written when it is made and checked when it is read.

    DIR/checksums.sha256    one ``<sha256>  <path relative to DIR>`` line per file, the format of ``sha256sum``
                            (so ``cd DIR && sha256sum -c checksums.sha256`` checks it without megarl)

Bit rot or a truncated copy inside a torch_dist shard otherwise goes unnoticed until values are wrong. A checksum
protects against damage, not against an attacker who can also rewrite this file: a checkpoint directory is code
(torch's distributed-checkpoint reader unpickles its ``.metadata``), so load only checkpoints from sources you
trust. Hashing reads every byte (about 1 GB/s per core); ``MEGARL_SKIP_CHECKSUMS=1`` skips the check for a huge
checkpoint you have verified otherwise.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

NAME = "checksums.sha256"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(root: str | Path) -> Path:
    """Hash every file under ``root`` (but this list) into ``root/checksums.sha256``; written atomically."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != NAME and not p.name.endswith(".tmp"))
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files]
    tmp = root / f".{NAME}.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, root / NAME)
    return root / NAME


def verify_checksums(root: str | Path) -> bool:
    """Raise ValueError naming the first missing or changed file; False when ``root`` has no checksums (made by
    an older megarl: nothing to check against), True when every file matches."""
    root = Path(root)
    listing = root / NAME
    if not listing.is_file() or os.environ.get("MEGARL_SKIP_CHECKSUMS") == "1":
        return False
    for line in listing.read_text().splitlines():
        want, _, rel = line.partition("  ")
        path = root / rel
        if not path.is_file():
            raise ValueError(f"{path}: missing from the checkpoint {root} (listed in {NAME}); the checkpoint is "
                             f"incomplete: copy it again, or use another checkpoint.")
        if sha256_file(path) != want:
            raise ValueError(f"{path}: damaged (its SHA-256 differs from {listing}); copy the checkpoint again, or "
                             f"use another checkpoint.")
    return True
