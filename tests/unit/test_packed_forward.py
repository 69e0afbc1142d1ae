"""A packed forward (samples back to back in one sequence, megarl/rollout/packing.py and
backends/megatron/packing.py) gives every sample the log-probs and entropies that Hugging Face transformers gives
it alone, for every model family and both log-prob paths; samples of length 1 and one that fills the whole token
budget included. TP2 / PP2 / TP2xPP2: tests/parallel/test_packed_parallel.py."""

from __future__ import annotations

import pytest
import torch

from megarl.convert.arch import read_arch
from megarl.convert.tiny import TINY_FAMILIES, checkpoint_tensors, tiny_hf_model
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
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
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
        load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
        ro = rollouts(1)
        mbs = micro_batches(ro, ro.groups(), BUDGET, packing=packing)

        def post(out, d):
            lp, _ = response_logprobs(model, arch, out, d["mb"], 1.0, "torch")
            return (lp * d["mb"].mask).sum() / 100.0, {}

        forward_backward(model, [_mb_inputs(mb) for mb in mbs], post, forward_only=False)
        grads[packing] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        assert (grads[True][name] - g).abs().max() < 1e-5 * max(1.0, g.abs().max().item()), name


@pytest.mark.parametrize("lengths", [[7, 7, 7, 7], [40, 3, 1, 25, 30, 2, 9], [1], [64, 1, 1, 1]])
def test_packed_attention_equals_block_diagonal_causal_softmax(megatron_world, lengths):
    """PackedDotProductAttention (samples batched by AttentionPlan) against float64 brute force: softmax(q k^T /
    sqrt(d)) per sample, causal, grouped-query heads; the gradients of q, k and v too."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megarl.backends.megatron.packing import PackedDotProductAttention, attention_buckets

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            attention_softmax_in_fp32=True, attention_dropout=0.0, hidden_dropout=0.0)
    attn = PackedDotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                     attention_type="self")
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    t, g = int(cu[-1]), torch.Generator().manual_seed(len(lengths))
    q, k, v = (torch.randn(t, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    out = attn(q, k, v, None, AttnMaskType.causal, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths)))
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out.double() * w).sum().backward()

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = (x[a:b].repeat_interleave(2, dim=1) for x in (k64, v64))  # query group h // 2 serves head h
        scores = torch.einsum("qhd,khd->hqk", q64[a:b], kk) / 4.0
        scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        want.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).reshape(b - a, 1, 64))
    want = torch.cat(want)
    (want * w).sum().backward()
    assert out.shape == (t, 1, 64) and (out.double() - want).abs().max() < 1e-5
    for x, x64 in ((q, q64), (k, k64), (v, v64)):
        assert (x.grad.double() - x64.grad).abs().max() < 1e-5
    buckets = attention_buckets(lengths)
    assert sorted(i for bk in buckets for i in bk) == list(range(len(lengths)))
    for bk in buckets:  # the batching never spends more than twice the samples' own attention cost
        assert len(bk) * max(lengths[i] for i in bk) ** 2 <= 2 * sum(lengths[i] ** 2 for i in bk)
    assert len(attention_buckets([7, 7, 7, 7])) == 1 and len(attention_buckets([64, 1, 1, 1])) == 2


@pytest.mark.parametrize("interleaved", [False, True])
def test_packed_rope_rotates_each_token_by_its_position_in_its_sample(megatron_world, interleaved):
    """The vectorised THD RoPE (install_packed_rope) against float64 brute force (each pair of features turned by
    position-in-sample x frequency) and, bit for bit, against megatron-core's stock per-sample loop; with an
    empty segment and a padding tail as the packer makes them."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings import rope_utils

    from megarl.backends.megatron.packing import _STOCK_ROPE, _packed_rope, install_packed_rope

    install_packed_rope()
    lengths, d = [5, 0, 9, 1, 3, 6], 16
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    t = torch.randn(int(cu[-1]), 3, d, generator=torch.Generator().manual_seed(0))
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(12, dtype=torch.float64), inv)  # [max_s, d/2], a table longer than any sample
    table = (angles.repeat_interleave(2, -1) if interleaved else torch.cat([angles, angles], -1))[:, None, None]
    group = parallel_state.get_context_parallel_group()
    got = _packed_rope(t, cu, table.float(), rotary_interleaved=interleaved, cp_group=group)
    assert rope_utils._apply_rotary_pos_emb_thd is _packed_rope
    assert torch.equal(got, _STOCK_ROPE[0](t, cu, table.float(), rotary_interleaved=interleaved, cp_group=group))
    pos = torch.cat([torch.arange(n) for n in lengths])
    x = t.double().unflatten(-1, (d // 2, 2)) if interleaved else \
        t.double().unflatten(-1, (2, d // 2)).transpose(-1, -2)
    x1, x2 = x[..., 0], x[..., 1]  # the pairs: (2i, 2i+1) interleaved, else (i, i + d/2)
    cos, sin = angles[pos].cos()[:, None], angles[pos].sin()[:, None]
    rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    want = rot.flatten(-2) if interleaved else rot.transpose(-1, -2).flatten(-2)
    assert (got.double() - want).abs().max() < 1e-5
