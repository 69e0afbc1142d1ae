"""Run a worker script under torchrun on CPU (gloo) and fail with its output if it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def torchrun(target: str, nproc: int, *args: str, timeout: int = 600, extra: tuple[str, ...] = ()) -> str:
    """``torchrun --standalone --nproc-per-node N target args``; ``target`` is a script (``*.py``, relative to
    the repository) or a module (run with ``-m``). Returns stdout+stderr; raises with them on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += list(extra) if extra else ["--standalone"]
    cmd += [str(REPO / target)] if target.endswith(".py") else ["-m", target]
    cmd += list(args)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {target} {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}")
    return out
