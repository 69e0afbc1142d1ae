"""A packed forward (samples back to back in one sequence, megarl/rollout/packing.py and
backends/megatron/packing.py) gives every sample the log-probs and entropies that Hugging Face transformers gives
it alone, for every model family and both log-prob paths; samples of length 1 and one that fills the whole token
budget included. TP2 / PP2 / TP2xPP2: tests/parallel/test_packed_parallel.py."""

from __future__ import annotations

import pytest
import torch

from megarl.convert.arch import read_arch
from megarl.convert.tiny import TINY_FAMILIES, tiny_hf_model
from megarl.rollout.batch import Rollouts

BUDGET = 48
# (prompt, response) lengths: a one-token response, a one-token prompt, and one sample of exactly BUDGET tokens
SHAPES = [(5, 1), (1, 7), (10, 4), (2, 2), (30, 18), (6, 9), (3, 1)]


def rollouts(seed: int = 0) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 300, (p,), generator=g).tolist() for p, _ in SHAPES]
    responses = [torch.randint(0, 300, (r,), generator=g).tolist() for _, r in SHAPES]
    return Rollouts(prompts, responses, [[0.0] * len(r) for r in responses], ["stop"] * len(SHAPES),
                    torch.arange(len(SHAPES)))


def hf_reference(hf, ro: Rollouts) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """log p and entropy of each response token, each sample run alone, in float64 from HF's logits."""
    lps, ents = [], []
    for p, y in zip(ro.prompt_ids, ro.response_ids):
        with torch.no_grad():
            logits = hf(torch.tensor([p + y])).logits[0].double()
        logp = torch.log_softmax(logits[len(p) - 1:len(p) - 1 + len(y)], -1)
        lps.append(logp.gather(1, torch.tensor(y)[:, None])[:, 0])
        ents.append(-(logp.exp() * logp).sum(-1))
    return lps, ents


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_packed_logprobs_equal_each_sample_alone(megatron_world, family, impl):
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.policy import rollout_logprobs
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.rollout.packing import make_packed_micro_batches

    hf = tiny_hf_model(family, seed=5)
    arch = read_arch(hf.config.to_dict())
    model = build_model(arch)
    load_hf_weights(model, arch, hf.state_dict().__getitem__)
    ro = rollouts()
    mbs = make_packed_micro_batches(ro, ro.groups(), BUDGET)
    assert 1 < len(mbs) < len(SHAPES) and all(mb.input_ids.shape == (1, BUDGET) for mb in mbs)  # really packed
    lp, ent = rollout_logprobs(model, arch, ro, BUDGET, 1.0, impl, packing=True)
    ref_lp, ref_ent = hf_reference(hf, ro)
    for r, (want_lp, want_ent) in enumerate(zip(ref_lp, ref_ent)):
        n = len(want_lp)
        assert (lp[r, :n].double() - want_lp).abs().max() < 2e-5, (family, impl, r)
        assert (lp[r, n:] == 0).all()
        if impl == "auto":  # the torch logits path gives entropies too; the fused one is checked for both
            assert (ent[r, :n].double() - want_ent).abs().max() < 2e-5, (family, r)
    padded, _ = rollout_logprobs(model, arch, ro, BUDGET, 1.0, impl, packing=False)
    assert (padded - lp).abs().max() < 2e-5  # and the right-padded path agrees


def test_packed_training_gradients_equal_padded(megatron_world):
    """One loss's gradients through packed and right-padded micro-batches agree (the backward of the mask path)."""
    from megarl.backends.megatron.forward import forward_backward
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.policy import _mb_inputs, response_logprobs
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.rollout.packing import micro_batches

    hf = tiny_hf_model("qwen2", seed=5)
    arch = read_arch(hf.config.to_dict())
    grads = {}
    for packing in (False, True):
        model = build_model(arch)
        load_hf_weights(model, arch, hf.state_dict().__getitem__)
        ro = rollouts(1)
        mbs = micro_batches(ro, ro.groups(), BUDGET, packing=packing)

        def post(out, d):
            lp, _ = response_logprobs(model, arch, out, d["mb"], 1.0, "torch")
            return (lp * d["mb"].mask).sum() / 100.0, {}

        forward_backward(model, [_mb_inputs(mb) for mb in mbs], post, forward_only=False)
        grads[packing] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        assert (grads[True][name] - g).abs().max() < 1e-5 * max(1.0, g.abs().max().item()), name
