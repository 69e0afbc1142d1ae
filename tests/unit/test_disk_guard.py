"""The suite's disk check (tests/conftest.py): a clear refusal up front instead of ENOSPC failures minutes in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cli  # every test here runs pytest in a subprocess

ROOT = Path(__file__).resolve().parents[2]


def collect(target: str, need_gb: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEGARL_TEST_DISK_GB": need_gb}
    return subprocess.run([sys.executable, "-m", "pytest", target, "--collect-only", "-q", "-p", "no:cacheprovider",
                           f"--basetemp={tmp_path / 'not' / 'made' / 'yet'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_checkpoint_writing_tests_refuse_a_disk_without_room(tmp_path):
    r = collect("tests/train/test_demo.py", "1e9", tmp_path)  # a billion GB: more than any disk has
    assert r.returncode == 4, r.stdout + r.stderr  # pytest's usage-error exit code
    err = r.stdout + r.stderr
    assert f"{tmp_path} has " in err and "GB free" in err  # the nearest existing folder of the basetemp
    assert "--basetemp=" in err and "MEGARL_TEST_DISK_GB=0" in err


def test_unit_tests_and_a_disabled_check_need_no_room(tmp_path):
    assert collect("tests/unit/test_losses.py", "1e9", tmp_path).returncode == 0
    r = collect("tests/train/test_demo.py", "0", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
