"""Each kind of CUDA call that cpu_compat redirects, exercised directly (CPU machines only: the layer must be a
no-op with CUDA, which the last test checks in a subprocess that pretends CUDA is present)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megarl.backends.megatron.cpu_compat import enable_cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the compatibility layer is inactive with CUDA")


@pytest.fixture(scope="module", autouse=True)
def compat():
    assert enable_cpu_compat() is True
    assert enable_cpu_compat() is True  # idempotent


def test_device_arguments_go_to_cpu():
    assert torch.ones(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.empty(3, device=torch.device("cuda", 0)).device.type == "cpu"
    t = torch.arange(4)
    assert t.cuda().device.type == "cpu" and t.to("cuda").device.type == "cpu"
    assert t.to(0).device.type == "cpu" and t.to(torch.float64).dtype == torch.float64
    assert torch.tensor([1, 2], device="cuda", pin_memory=True).tolist() == [1, 2]
    assert torch.ones(2).pin_memory().device.type == "cpu"


def test_megatron_call_sites_that_hard_code_cuda():
    from megatron.core.transformer.utils import get_default_causal_mask
    from megatron.core.utils import GlobalMemoryBuffer

    mask = get_default_causal_mask(3)
    assert mask.device.type == "cpu" and mask.tolist() == [[False, True, True], [False, False, True],
                                                           [False, False, False]]
    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    assert buf.shape == (2, 3) and buf.device.type == "cpu"


def test_runtime_queries():
    assert torch.cuda.current_device() == 0
    assert torch.cuda.synchronize() is None


def test_rng_tracker_forks_named_cpu_states_reproducibly():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = get_cuda_rng_tracker()
    torch.manual_seed(0)
    outside_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside_before)  # the default stream is untouched by the fork
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the named state advanced
    model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)  # same seed, same stream
    model_parallel_cuda_manual_seed(5, tp_rank=1, ep_rank=0, etp_rank=0)
    with get_cuda_rng_tracker().fork():
        assert not torch.equal(torch.rand(3), a)  # another TP rank draws another stream
    with pytest.raises(Exception, match="already exists"):
        get_cuda_rng_tracker().add("another", 5)


def test_type_strings_spoofed_only_for_megatron_callers():
    t = torch.zeros(2)
    assert t.type() == "torch.FloatTensor"
    code = compile("result = t.type()", "<megatron>", "exec")
    scope = {"t": t, "__name__": "megatron.core.optimizer.optimizer"}
    exec(code, scope)
    assert scope["result"] == "torch.cuda.FloatTensor"
    assert t.type(torch.float64).dtype == torch.float64  # with an argument it is a conversion, untouched


def test_cuda_seed_seeds_the_cpu_generator():
    torch.cuda.manual_seed(11)
    a = torch.rand(2)
    torch.manual_seed(11)
    assert torch.equal(a, torch.rand(2))


@pytest.mark.cli
def test_inactive_when_cuda_is_present():
    code = ("import torch; torch.cuda.is_available = lambda: True; orig = torch.cuda.current_device\n"
            "from megarl.backends.megatron import cpu_compat as c\n"
            "assert c.enable_cpu_compat() is False and not c.cpu_compat_active()\n"
            "assert torch.cuda.current_device is orig\n"
            "from torch.overrides import _get_current_function_mode_stack as s; assert not s()\n"
            "print('inactive')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "inactive" in out.stdout
