"""Native Megatron KV-cache generator (TP=1 in-process) against HF greedy decoding and teacher-forced log-probs;
sampling options; weight loading. TP2/PP2 runs are in tests/parallel/test_generator_tp_pp.py."""

from __future__ import annotations

import pytest
import torch

from megarl.backends.protocols import SamplingParams
from megarl.convert.arch import read_arch
from megarl.convert.tiny import TINY_FAMILIES, checkpoint_tensors, tiny_hf_model
from megarl.rollout.sampling import sample_tokens

PROMPTS = [[5, 9, 17, 3], [100, 2, 7, 8, 9, 10, 11]]


def make(family="llama", seed=3):
    from megarl.backends.megatron.generator import MegatronGenerator
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.weights import load_hf_weights

    hf = tiny_hf_model(family, seed=seed)
    arch = read_arch(hf.config.to_dict())
    model = build_model(arch)
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
    return hf, arch, model, MegatronGenerator(model, arch)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_equals_hf_greedy(megatron_world, family):
    hf, _, _, gen = make(family)
    out = gen.generate(PROMPTS, 2, SamplingParams(max_tokens=10, temperature=0))
    for prompt, comps in zip(PROMPTS, out):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt):]
        for c in comps:
            assert c.token_ids == ref.tolist() and c.finish_reason == "length" and len(c.logprobs) == 10


def teacher_forced_logprobs(model, arch, prompt, completion, temperature):
    from megarl.backends.megatron.forward import forward_backward, token_logprobs

    ids = torch.tensor([prompt + completion])
    targets = torch.tensor([prompt[1:] + completion + [0]])
    out = forward_backward(model, [{"input_ids": ids, "targets": targets}],
                           lambda out, mb: token_logprobs(out, mb["targets"], arch.vocab_size, temperature)[0],
                           forward_only=True)
    if not out:  # not the last pipeline stage
        return None
    return out[0][0, len(prompt) - 1: len(prompt) - 1 + len(completion)]


def test_sampled_logprobs_equal_teacher_forced_logprobs_and_seeds_reproduce(megatron_world):
    _, arch, model, gen = make("qwen2")
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=7)
    a = gen.generate(PROMPTS, 3, params)
    b = gen.generate(PROMPTS, 3, params)
    c = gen.generate(PROMPTS, 3, SamplingParams(max_tokens=12, temperature=0.8, seed=8))
    assert [[x.token_ids for x in p] for p in a] == [[x.token_ids for x in p] for p in b]
    assert [[x.token_ids for x in p] for p in a] != [[x.token_ids for x in p] for p in c]
    assert len({tuple(x.token_ids) for x in a[0]}) > 1  # the n samples differ
    for prompt, comps in zip(PROMPTS, a):
        for comp in comps:  # the KV-cache pass and a full forward agree on every sampled token
            ref = teacher_forced_logprobs(model, arch, prompt, comp.token_ids, 0.8)
            torch.testing.assert_close(torch.tensor(comp.logprobs, dtype=torch.float32), ref, rtol=1e-5, atol=2e-5)


def test_batched_prompts_sample_what_each_prompt_samples_alone(megatron_world):
    """Equal-length prompts share one KV-cached batch; a prompt's samples depend on its seed only, not on its batch
    partners, its position or the batch size (max_batch_rows)."""
    from megarl.backends.megatron.generator import MegatronGenerator

    _, arch, model, gen = make("qwen2")
    prompts = [[5, 9, 17, 3], [1, 2, 3, 4], [100, 2, 7, 8, 9, 10, 11], [6, 6, 6, 6]]
    seeds = [11, 12, 13, 14]
    params = SamplingParams(max_tokens=10, temperature=0.9, stop_ids=(7, 40))
    together = gen.generate(prompts, 3, params, seeds=seeds)
    one_per_batch = MegatronGenerator(model, arch, max_batch_rows=3).generate(prompts, 3, params, seeds=seeds)
    for prompt, seed, batched, small in zip(prompts, seeds, together, one_per_batch):
        alone = gen.generate([prompt], 3, params, seeds=[seed])[0]
        for x, y, z in zip(batched, alone, small):
            assert x.token_ids == y.token_ids == z.token_ids and x.finish_reason == y.finish_reason
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    finishes = {c.finish_reason for p in together for c in p}
    assert finishes == {"stop", "length"}  # rows of one batch stop on their own
    for c in (c for p in together for c in p if c.finish_reason == "stop"):
        assert c.token_ids[-1] in (7, 40) and not set(c.token_ids[:-1]) & {7, 40}
    with pytest.raises(ValueError, match="one seed per prompt"):
        gen.generate(prompts, 1, params, seeds=[1])


def test_stop_ids_top_k_top_p_and_weight_loading(megatron_world):
    hf, _, _, gen = make("llama")
    greedy = gen.generate(PROMPTS, 1, SamplingParams(max_tokens=6, temperature=0))
    stop = greedy[0][0].token_ids[2]
    stopped = gen.generate(PROMPTS[:1], 2, SamplingParams(max_tokens=6, temperature=0, stop_ids=(stop,)))[0]
    assert all(c.finish_reason == "stop" and c.token_ids == greedy[0][0].token_ids[:3] for c in stopped)
    for params in (SamplingParams(max_tokens=6, temperature=1.0, top_k=1, seed=3),
                   SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-6, seed=3)):
        assert [c.token_ids for c in gen.generate(PROMPTS, 1, params)[0]] == [greedy[0][0].token_ids]
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in hf.state_dict().items()}
    gen.load_weights(perturbed.items())
    changed = gen.generate(PROMPTS, 1, SamplingParams(max_tokens=6, temperature=0))
    assert [p[0].token_ids for p in changed] != [p[0].token_ids for p in greedy]
    gen.load_weights(hf.state_dict().items())
    assert [p[0].token_ids for p in gen.generate(PROMPTS, 1, SamplingParams(max_tokens=6, temperature=0))] == \
        [p[0].token_ids for p in greedy]


def test_sample_tokens_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_tokens(logits, 1.0, top_k=2, generator=g)
    assert set(tok.tolist()) == {0, 1}
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1))
    probs = torch.softmax(logits[0], -1)  # 0.636, 0.234, 0.086, ...: top_p=0.8 keeps tokens 0 and 1
    tok, _ = sample_tokens(logits, 1.0, top_p=0.8, generator=g)
    assert set(tok.tolist()) == {0, 1} and probs[:2].sum() >= 0.8 > probs[0]
    frac0 = (tok == 0).float().mean().item()
    assert abs(frac0 - float(probs[0] / probs[:2].sum())) < 0.03  # renormalised over the kept set


def test_sampling_params_are_validated():
    with pytest.raises(ValueError, match=r"rollout\.top_p"):
        SamplingParams(max_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match=r"rollout\.max_tokens"):
        SamplingParams(max_tokens=0)
