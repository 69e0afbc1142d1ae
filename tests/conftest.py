"""Shared fixtures and markers. A bare ``pytest`` runs the fast CPU suite (``-m 'not gpu and not slow'``).

- ``gpu``: needs CUDA; ``pytest -m gpu`` on a GPU machine. Those tests fail (not skip) if CUDA is absent,
  so a GPU run can never pass vacuously.
- ``slow``: minutes of CPU; ``pytest -m slow``.
- ``dist``: launches torchrun worker processes (gloo); part of the default suite.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The most the default suite holds at once under pytest's temp dir, with margin: 1.6 GB measured (the SmolLM2
# round trip's two converted copies on top of the session's bundled model), each passed test's tmp_path being
# deleted as it ends (pyproject: tmp_path_retention_policy). MEGARL_TEST_DISK_GB overrides it (0: no check).
SUITE_DISK_GB = 2.5


def pytest_collection_finish(session):
    """Refuse to start, naming the folder and the fix, when the checkpoint-writing tests are selected and the temp
    folder's disk has too little room: otherwise they fail one by one with ENOSPC after minutes of work."""
    need_gb = float(os.environ.get("MEGARL_TEST_DISK_GB", SUITE_DISK_GB))
    heavy = {("tests", "parallel"), ("tests", "train"), ("tests", "vllm")}
    root = session.config.rootpath
    if need_gb <= 0 or not any(
            item.path.is_relative_to(root) and item.path.relative_to(root).parts[:2] in heavy
            for item in session.items):
        return
    where = Path(session.config.option.basetemp or os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir())
    where = next(p for p in (where, *where.parents) if p.exists())
    free_gb = shutil.disk_usage(where).free / 1e9
    if free_gb < need_gb:
        raise pytest.UsageError(
            f"{where} has {free_gb:.1f} GB free; the selected tests write checkpoints and need about {need_gb:g} GB "
            "there. Free some space, or point pytest at a larger disk with `--basetemp=/big/disk/megarl-tests` "
            "(or TMPDIR=/big/disk), or set MEGARL_TEST_DISK_GB=0 to run anyway.")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A gpu test fails, with this message, before its skip conditions or fixtures are looked at."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.fail("this test is marked gpu and CUDA is not available; run `pytest -m gpu` on a GPU machine")


@pytest.fixture(scope="session")
def megatron_world():
    """An in-process world of one rank with Megatron's TP=PP=1 groups, for tests that build models directly."""
    from megarl.backends.megatron.parallel import ParallelDims, destroy_model_parallel, init_model_parallel
    from megarl.distributed import init_distributed, shutdown_distributed

    init_distributed()
    init_model_parallel(ParallelDims(1, 1), seed=1234)
    yield
    destroy_model_parallel()
    shutdown_distributed()


@pytest.fixture(scope="session")
def megarl_cache(tmp_path_factory):
    """A private MEGARL_CACHE holding the bundled SmolLM2-135M-Instruct, made once per session."""
    from megarl.convert.bundled import SMOLLM2_NAME, materialize_smollm2

    cache = tmp_path_factory.mktemp("megarl_cache")
    materialize_smollm2(cache / "models" / SMOLLM2_NAME)
    return cache


@pytest.fixture(scope="session")
def smollm2_dir(megarl_cache):
    from megarl.convert.bundled import SMOLLM2_NAME

    return megarl_cache / "models" / SMOLLM2_NAME


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_launcher_variables_leak():
    """A test that builds a vLLM engine in pytest's own process (vLLM's launcher sets RANK, WORLD_SIZE, ...) makes
    every later `megarl` subprocess believe it runs under torchrun. Fail the test that leaked them, by name."""
    before = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    yield
    leaked = sorted(k for k in _LAUNCH_VARS if os.environ.get(k) != before[k])
    for k in leaked:
        os.environ.pop(k, None) if before[k] is None else os.environ.__setitem__(k, before[k])
    assert not leaked, f"this test left {leaked} in pytest's environment; run vLLM in a worker process instead"
