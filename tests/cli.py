"""Run the ``megarl`` command the way a user does, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys


def megarl(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megarl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
