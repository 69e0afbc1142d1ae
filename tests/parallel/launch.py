"""Run a worker script under torchrun on CPU (gloo) and fail with its output if it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def torchrun(script: str, nproc: int, *args: str, timeout: int = 600, nnodes: int = 1,
             extra: tuple[str, ...] = ()) -> str:
    """``python -m torch.distributed.run --standalone --nproc-per-node N script args``; returns stdout+stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += list(extra) if extra else ["--standalone"]
    cmd += [str(REPO / script), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}")
    return out
