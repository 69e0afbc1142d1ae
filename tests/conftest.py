"""Shared fixtures and markers. A bare ``pytest`` runs the fast CPU suite (``-m 'not gpu and not slow'``).

- ``gpu``: needs CUDA; ``pytest -m gpu`` on a GPU machine. Those tests fail (not skip) if CUDA is absent,
  so a GPU run can never pass vacuously.
- ``slow``: minutes of CPU; ``pytest -m slow``.
- ``dist``: launches torchrun worker processes (gloo); part of the default suite.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
