"""Mixture-of-experts models built in-process (world of one) against transformers, the independent reference: both
router variants (renormalised top-k and plain softmax top-k), a router that drops tokens, and the reading of
MoE configs."""

from __future__ import annotations

import pytest
import torch

from megarl.convert.arch import UnsupportedModel, read_arch
from megarl.convert.tiny import checkpoint_tensors, tiny_hf_config, tiny_hf_model


def megatron_logits(hf, ids, moe=None):
    from megarl.backends.megatron.forward import forward_backward, gather_logits
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.weights import load_hf_weights

    arch = read_arch(hf.config.to_dict())
    model = build_model(arch, moe=moe)
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
    model.eval()
    return forward_backward(model, [{"input_ids": ids}], lambda out, mb: gather_logits(out, arch.vocab_size),
                            forward_only=True)[0]


@pytest.mark.parametrize("family,overrides", [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}),
                                              ("qwen3_moe", {"norm_topk_prob": False, "num_experts_per_tok": 1}),
                                              ("mixtral", {})],
                         ids=["qwen3_moe", "qwen3_moe-no-renorm", "qwen3_moe-no-renorm-top1", "mixtral"])
def test_moe_logits_match_transformers(megatron_world, family, overrides):
    hf = tiny_hf_model(family, seed=5, **overrides)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits.detach()
    assert (megatron_logits(hf, ids) - ref).abs().max() < 1e-5


def test_a_capacity_factor_drops_tokens_and_changes_the_output(megatron_world):
    """Dropless is the default (equal to HF); with a small capacity each expert takes at most its share, so the
    output moves (the router drops the lowest-probability assignments)."""
    from megarl.config import MoESection

    hf = tiny_hf_model("mixtral", seed=5)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits.detach()
    dropped = megatron_logits(hf, ids, MoESection(capacity_factor=0.25))
    assert (dropped - ref).abs().max() > 1e-2


def test_moe_configs_are_read_and_their_unsupported_layouts_refused():
    arch = read_arch(tiny_hf_config("qwen3_moe").to_dict())
    assert (arch.num_experts, arch.moe_top_k, arch.moe_ffn_hidden_size, arch.moe_norm_topk, arch.qk_norm) == \
        (4, 2, 64, True, True)
    cfg = tiny_hf_config("qwen3_moe").to_dict()
    del cfg["norm_topk_prob"]  # transformers' Qwen3MoeConfig default is False
    assert read_arch(cfg).moe_norm_topk is False
    mixtral = read_arch(tiny_hf_config("mixtral").to_dict())
    assert (mixtral.family, mixtral.num_experts, mixtral.moe_ffn_hidden_size, mixtral.qk_norm) == \
        ("mixtral", 4, 64, False)
    for bad, match in (({"mlp_only_layers": [1]}, "mlp_only_layers"), ({"decoder_sparse_step": 2}, "decoder_sparse"),
                       ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 must be between 1 and the number of "
                                                    "experts \\(4\\)")):
        with pytest.raises(UnsupportedModel, match=match):
            read_arch({**tiny_hf_config("qwen3_moe").to_dict(), **bad})
    with pytest.raises(UnsupportedModel, match="top-1 routing with renormalised weights"):
        read_arch({**tiny_hf_config("mixtral").to_dict(), "num_experts_per_tok": 1})
    with pytest.raises(UnsupportedModel, match="router_jitter_noise=0.1"):
        read_arch({**tiny_hf_config("mixtral").to_dict(), "router_jitter_noise": 0.1})


def test_router_loss_enters_the_gradient_as_a_token_weighted_mean(megatron_world):
    """Two passes of 10 and 24 tokens under ``router_losses_scaled(model, 1 / 34)`` with a zero policy loss: the
    last layer's router-weight gradient equals, by autograd on a formula written out here, the gradient of
    c x sum_passes (n / N) x aux, aux = E / (k n^2) x sum_e count_e x sum_t p_te (the Switch Transformer loss as
    megatron-core defines it: count_e tokens with e among their top k, p the softmax over all experts), c the
    checkpoint's router_aux_loss_coef."""
    from megarl.backends.megatron import moe
    from megarl.backends.megatron.forward import forward_backward
    from megarl.backends.megatron.model import build_model, unwrap
    from megarl.backends.megatron.weights import load_hf_weights

    hf = tiny_hf_model("qwen3_moe", seed=5)
    arch = read_arch(hf.config.to_dict())
    model = build_model(arch)
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
    model.train()
    router = unwrap(model).decoder.layers[-1].mlp.router
    seen = []
    hook = router.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, 128).clone()))
    gen = torch.Generator().manual_seed(1)
    passes = [torch.randint(0, 300, (2, 5), generator=gen), torch.randint(0, 300, (3, 8), generator=gen)]
    with moe.router_losses_scaled(model, 1.0 / 34):
        for ids in passes:
            forward_backward(model, [{"input_ids": ids}], lambda out, mb: (out.sum() * 0.0, {}), forward_only=False)
    hook.remove()
    weight = router.weight.detach().clone().requires_grad_(True)
    total = 0.0
    for x in seen:
        n, (E, k) = x.shape[0], (arch.num_experts, arch.moe_top_k)
        logits = x.float() @ weight.t()
        p = torch.softmax(logits, -1)
        count = torch.zeros(E).scatter_add_(0, logits.topk(k, -1).indices.reshape(-1), torch.ones(n * k))
        aux = E / (k * n * n) * (count * p.sum(0)).sum()
        total = total + arch.moe_aux_loss_coef * (n / 34) * aux
    total.backward()
    assert arch.moe_aux_loss_coef == 0.01 and weight.grad.abs().max() > 1e-6
    torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-4, atol=1e-9)
