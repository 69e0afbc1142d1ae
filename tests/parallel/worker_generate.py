"""torchrun worker: the native KV-cache generator at the launched TP/PP layout equals HF greedy decoding, and
its sampled log-probs equal teacher-forced log-probs of the same model. With --ep (a MoE model, experts split
over the ranks) the ranks get different prompts -- rank 0 all of them, the others one -- and a stop token, so
they run different numbers of batches and finish at different steps: the expert-parallel passes must still
meet (else the run hangs or mixes tokens) and every rank's greedy output must equal HF's."""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
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

    with distributed() as info, model_parallel(ParallelDims(args.tp, args.pp, ep=args.ep)):
        if args.ep > 1:
            expert_parallel_greedy(info, checkpoint_tensors, tiny_hf_model, PROMPTS)
            return
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


def expert_parallel_greedy(info, checkpoint_tensors, tiny_hf_model, prompts) -> None:
    from megarl.backends.megatron.generator import MegatronGenerator
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.backends.protocols import SamplingParams
    from megarl.convert.arch import read_arch

    from megarl.config import MoESection

    for family in ("qwen3_moe", "mixtral"):
        hf = tiny_hf_model(family, seed=3)
        arch = read_arch(hf.config.to_dict())
        try:  # gloo: only the alltoall dispatcher takes the uneven token counts of EP ranks
            build_model(arch, moe=MoESection(dispatcher="allgather"))
            raise AssertionError("the allgather dispatcher was built at ep > 1 on gloo")
        except ValueError as e:
            assert "moe.dispatcher=allgather at parallel.ep > 1 needs NCCL" in str(e), e
        model = build_model(arch, moe=MoESection(dispatcher="alltoall"))
        load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
        refs = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]
        stop = refs[0][2]  # prompt 0 stops after 3 tokens; rank 0's other prompts run longer (or stop on it too)
        mine = prompts if info.rank == 0 else prompts[:1]
        out = MegatronGenerator(model, arch, max_batch_rows=2).generate(
            mine, 2, SamplingParams(max_tokens=8, temperature=0, stop_ids=(stop,)))
        for ref, comps in zip(refs, out):
            cut = ref[: ref.index(stop) + 1] if stop in ref else ref
            assert all(c.token_ids == cut for c in comps), (family, info.rank, comps[0].token_ids, cut)
        if info.is_main:
            print(f"[ep{torch.distributed.get_world_size()}] {family}: greedy == HF on uneven prompts; "
                  f"allgather refused on gloo", flush=True)


if __name__ == "__main__":
    main()
