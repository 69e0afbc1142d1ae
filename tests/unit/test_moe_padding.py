"""Padding tokens in the router losses and metrics of a MoE model (world of one): a pass's padding mask leaves them
out, against the same tokens without padding and against the router losses written out by hand."""

from __future__ import annotations

import torch

from megarl.convert.arch import read_arch
from megarl.convert.tiny import checkpoint_tensors, tiny_hf_model

Z = 0.01  # the z-loss coefficient used here (the checkpoint's load-balancing coefficient is 0.01)


def trained_model():
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.config import MoESection

    hf = tiny_hf_model("qwen3_moe", seed=5)
    arch = read_arch(hf.config.to_dict())
    model = build_model(arch, moe=MoESection(z_loss_coef=Z))
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
    model.train()
    return model, arch


def step(passes: list[dict], real_tokens: int, *, mask: bool = True):
    """Every parameter's gradient and the router metrics after ``passes`` (input_ids, padding [b, s] bool and, when
    packed, position_ids and cu) under a loss on the real tokens' logits, with the router losses as means over
    ``real_tokens``; ``mask=False`` leaves the padding mask out of the model's input (not out of the loss)."""
    from megarl.backends.megatron import moe
    from megarl.backends.megatron.forward import forward_backward
    from megarl.backends.megatron.packing import packed_seq_params

    model, _ = trained_model()

    def loss(out, mb):  # only real positions: whatever the padding computes must not reach a gradient
        return (out[~mb["real_padding"]].float() ** 2).sum() * 1e-4, {}

    with moe.RouterStats(model) as stats, moe.router_losses_scaled(model, 1.0 / real_tokens):
        for p in passes:
            mb = {"input_ids": p["input_ids"], "real_padding": p["padding"]}
            if mask:
                mb["padding"] = p["padding"]
            if "cu" in p:
                cu = torch.tensor(p["cu"], dtype=torch.int32)
                mb["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(p["cu"], p["cu"][1:])])[None]
                mb["model_kwargs"] = {"packed_seq_params": packed_seq_params(cu, int((cu[1:] - cu[:-1]).max()),
                                                                             torch.device("cpu"))}
            forward_backward(model, [mb], loss, forward_only=False)
    return {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}, stats.metrics()


def test_padding_changes_no_gradient_and_no_router_metric(megatron_world):
    """Two sequences of 10 and 13 tokens in one pass, with the load-balancing loss and the z-loss on: right-padded
    to [2, 16], and packed with a padding tail to [1, 28] (random token ids as padding), give every gradient and
    router metric of the same two sequences packed with no padding at all ([1, 23]). Without the mask the padding
    is routed into the router losses and changes them."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 300, (10,), generator=g), torch.randint(0, 300, (13,), generator=g)
    noise = torch.randint(0, 300, (2, 16), generator=g)
    padded = torch.stack([torch.cat([a, noise[0, :6]]), torch.cat([b, noise[1, :3]])])
    pad_rows = torch.zeros(2, 16, dtype=torch.bool)
    pad_rows[0, 10:], pad_rows[1, 13:] = True, True
    tail = torch.zeros(1, 28, dtype=torch.bool)
    tail[0, 23:] = True
    reference = step([{"input_ids": torch.cat([a, b])[None], "padding": torch.zeros(1, 23, dtype=torch.bool),
                       "cu": [0, 10, 23]}], 23)
    for name, p in (("right-padded", {"input_ids": padded, "padding": pad_rows}),
                    ("packed tail", {"input_ids": torch.cat([a, b, noise[0, :5]])[None], "padding": tail,
                                     "cu": [0, 10, 23, 28]})):
        grads, metrics = step([p], 23)
        assert set(grads) == set(reference[0]) and metrics.keys() == reference[1].keys()
        for k, want in reference[0].items():
            torch.testing.assert_close(grads[k], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()),
                                       msg=lambda m: f"{name} {k}: {m}")
        for k, want in reference[1].items():
            assert abs(metrics[k] - want) <= 1e-6 * max(1.0, abs(want)), (name, k, metrics[k], want)
    unmasked, metrics = step([{"input_ids": padded, "padding": pad_rows}], 23, mask=False)
    router = next(k for k in unmasked if k.endswith("router.weight"))
    assert (unmasked[router] - reference[0][router]).abs().max() > 1e-3 * reference[0][router].abs().max()
    assert metrics["moe/z_loss"] != reference[1]["moe/z_loss"]


def test_router_losses_are_token_weighted_means_over_real_tokens(megatron_world):
    """Two right-padded passes ([2, 8] holding 5 + 8 real tokens, [3, 8] holding 8 + 3 + 6) under
    ``router_losses_scaled(model, 1 / 30)`` with a zero policy loss: the last layer's router-weight gradient equals, by
    autograd on formulas written out here over the real tokens only, the gradient of
    sum_passes (n / N) [c E / (k n^2) sum_e count_e sum_t p_te] + z / N sum_passes sum_t logsumexp(logits_t)^2
    (megatron-core's Switch Transformer load-balancing loss, c the checkpoint's 0.01; the ST-MoE z-loss), and the
    router metrics are these counts' imbalance and the z-loss's mean over the 30 tokens."""
    from megarl.backends.megatron import moe
    from megarl.backends.megatron.forward import forward_backward
    from megarl.backends.megatron.model import unwrap

    model, arch = trained_model()
    routers = [layer.mlp.router for layer in unwrap(model).decoder.layers]
    seen = {r: [] for r in routers}
    hooks = [r.register_forward_pre_hook(lambda m, args: seen[m].append(
        (args[0].detach().reshape(-1, args[0].shape[-1]).clone(), args[1].reshape(-1).clone()))) for r in routers]
    gen = torch.Generator().manual_seed(1)
    passes = []
    for lengths in ((5, 8), (8, 3, 6)):
        padding = torch.arange(8)[None, :] >= torch.tensor(lengths)[:, None]
        passes.append({"input_ids": torch.randint(0, 300, (len(lengths), 8), generator=gen), "padding": padding})
    with moe.RouterStats(model) as stats, moe.router_losses_scaled(model, 1.0 / 30):
        for p in passes:
            forward_backward(model, [p], lambda out, mb: (out.sum() * 0.0, {}), forward_only=False)
    metrics = stats.metrics()
    for h in hooks:
        h.remove()
    E, k, N = arch.num_experts, arch.moe_top_k, 30
    imbalance, z_mean = [], []
    for router in routers:
        weight = router.weight.detach().clone().requires_grad_(True)
        total, load, z_sum = 0.0, torch.zeros(E), 0.0
        for x, pad in seen[router]:
            logits = x[~pad].float() @ weight.t()
            n, p = logits.shape[0], torch.softmax(logits, -1)
            count = torch.zeros(E).scatter_add_(0, logits.topk(k, -1).indices.reshape(-1), torch.ones(n * k))
            total = total + arch.moe_aux_loss_coef * (n / N) * E / (k * n * n) * (count * p.sum(0)).sum()
            lse2 = torch.logsumexp(logits, -1) ** 2
            total = total + Z * lse2.sum() / N
            load, z_sum = load + count, z_sum + float(lse2.sum().detach())
        if router is routers[-1]:  # an earlier router's gradient also has the later layers' losses in it
            total.backward()
            assert weight.grad.abs().max() > 1e-6
            torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-4, atol=1e-9)
        imbalance.append(float(load.max() / load.mean()))
        z_mean.append(z_sum / N)
    assert abs(metrics["moe/load_imbalance"] - sum(imbalance) / len(imbalance)) < 1e-6
    assert abs(metrics["moe/z_loss"] - sum(z_mean) / len(z_mean)) < 1e-5 * max(z_mean)
    assert metrics["moe/dropped_fraction"] == 0.0


def test_full_recompute_counts_each_pass_once(megatron_world):
    """Under ``model.recompute=full`` each layer's forward runs twice (without gradients, then again in the
    backward, where megatron-core computes the router losses): the router metrics and gradients equal the stored
    run's, so the metrics count each pass once."""
    from megarl.backends.megatron import moe
    from megarl.backends.megatron.forward import forward_backward
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.config import MoESection

    hf = tiny_hf_model("qwen3_moe", seed=5)
    arch = read_arch(hf.config.to_dict())
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(2))
    padding = torch.arange(8)[None, :] >= torch.tensor([[8], [5]])
    out = []
    for recompute in ("none", "full"):
        model = build_model(arch, moe=MoESection(z_loss_coef=Z), recompute=recompute)
        load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
        model.train()
        with moe.RouterStats(model) as stats, moe.router_losses_scaled(model, 1.0 / 13):
            forward_backward(model, [{"input_ids": ids, "padding": padding}],
                             lambda o, mb: ((o[~padding].float() ** 2).sum() * 1e-4, {}), forward_only=False)
        out.append((stats.metrics(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (stored, g_stored), (recomputed, g_recomputed) = out
    assert stored.keys() == recomputed.keys() and {"moe/load_balancing_loss", "moe/z_loss"} <= set(stored)
    for k, v in stored.items():
        assert abs(recomputed[k] - v) <= 1e-6 * max(1.0, abs(v)), (k, recomputed[k], v)
    for n, g in g_stored.items():
        torch.testing.assert_close(g_recomputed[n], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=n)
