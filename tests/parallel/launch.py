"""Run a worker script under torchrun on CPU (gloo) and fail with its output if it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _target(target: str) -> list[str]:
    return [str(REPO / target)] if target.endswith(".py") else ["-m", target]


def torchrun_nodes(target: str, nnodes: int, *args: str, timeout: int = 600) -> list[str]:
    """``nnodes`` torchrun "nodes" on this machine, one rank each, meeting over localhost exactly as the README's
    multi-node command does (``--nnodes N --node-rank i --master-addr/--master-port``). Returns each node's
    output; raises with all of them if any node fails."""
    from megarl.distributed import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
                               "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                               "--master-port", str(port), *_target(target), *args],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in range(nnodes)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    if any(p.returncode for p in procs):
        raise AssertionError(f"{nnodes} nodes of {target} {' '.join(args)} exited "
                             f"{[p.returncode for p in procs]}:\n" + "\n".join(o[-3000:] for o in outs))
    return outs


def torchrun(target: str, nproc: int, *args: str, timeout: int = 600, extra: tuple[str, ...] = ()) -> str:
    """``torchrun --standalone --nproc-per-node N target args``; ``target`` is a script (``*.py``, relative to
    the repository) or a module (run with ``-m``). Returns stdout+stderr; raises with them on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += list(extra) if extra else ["--standalone"]
    cmd += _target(target) + list(args)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {target} {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}")
    return out
