"""torchrun worker: the native KV-cache generator at the launched TP/PP layout equals HF greedy decoding, and
its sampled log-probs equal teacher-forced log-probs of the same model."""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()
    from megarl.backends.megatron.generator import MegatronGenerator
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.backends.protocols import SamplingParams
    from megarl.convert.arch import read_arch
    from megarl.convert.tiny import checkpoint_tensors, tiny_hf_model
    from megarl.distributed import distributed
    from tests.unit.test_generator import PROMPTS, teacher_forced_logprobs

    with distributed() as info, model_parallel(ParallelDims(args.tp, args.pp)):
        for family in ("llama", "qwen3"):
            hf = tiny_hf_model(family, seed=3)
            arch = read_arch(hf.config.to_dict())
            model = build_model(arch)
            load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
            gen = MegatronGenerator(model, arch)
            out = gen.generate(PROMPTS, 2, SamplingParams(max_tokens=8, temperature=0))
            for prompt, comps in zip(PROMPTS, out):
                ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
                assert all(c.token_ids == ref for c in comps), (family, comps[0].token_ids, ref)
            sampled = gen.generate(PROMPTS, 2, SamplingParams(max_tokens=8, temperature=1.0, seed=5))
            for prompt, comps in zip(PROMPTS, sampled):
                for comp in comps:
                    ref = teacher_forced_logprobs(model, arch, prompt, comp.token_ids, 1.0)
                    if ref is not None and len(ref):  # full logits exist on the last stage only
                        got = torch.tensor(comp.logprobs, dtype=torch.float32)
                        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
            if info.is_main:
                print(f"[tp{args.tp} pp{args.pp}] {family}: greedy == HF, sampled log-probs consistent", flush=True)


if __name__ == "__main__":
    main()
