"""Rollout backends: Megatron -> vLLM weight-sync time against model size, and generation throughput of vLLM and
of the native Megatron generator on the same model, prompts and sampling settings.

    .venv/bin/python bench/rollout.py                       # CPU: writes bench/results/cpu/rollout.json
    python bench/rollout.py --models smollm2 --samples 8    # any subset

Models: random Qwen2-shaped models of growing hidden size (4 layers, SmolLM2's 49,152-token vocabulary, tied
embeddings, made in-process) and the bundled SmolLM2-135M-Instruct. Each model runs in a fresh process (one
trainer build per process) that builds the trainer's components with rollout.backend=vllm at TP=1, then measures:

    sync        ColocatedVLLM.sync(): Megatron export (HF names, buckets) -> vLLM in-place reload -> prefix-cache
                reset -> name check -> 192-token log-prob probe on both sides. Median of --repeats; split into
                the probe and the rest (stream) by timing the probe alone.
    export      the policy written as a Hugging Face directory (safetensors) by the policy's export_hf.
    generation  --prompts prompts (the task's real chat prompts) x --samples samples x --max-tokens tokens
                (no stop ids, so every sample has that length), temperature 1; tokens/s = generated / seconds.
                vLLM and the native generator, the same weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"h128": 128, "h256": 256, "h512": 512}


def model_dir(name: str, work: Path) -> str:
    if name == "smollm2":
        return "bundled:smollm2"
    from megarl.convert.bundled import write_tiny_model

    out = work / name
    h = SIZES[name]
    write_tiny_model(out, "qwen2", seed=0, hidden_size=h, intermediate_size=4 * h)
    return str(out)


def one_model(name: str, args, work: Path) -> dict:
    import torch

    from megarl.backends.megatron.generator import MegatronGenerator
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.backends.protocols import SamplingParams
    from megarl.config import load_config
    from megarl.distributed import distributed
    from megarl.trainer.build import build
    from megarl.trainer.state import prepare_run_dir

    cfg = load_config(None, [f"model.hf_dir={model_dir(name, work)}", f"run.dir={work / 'run'}",
                             "rollout.backend=vllm", "reward.num_workers=0", "data.generate=arithmetic",
                             "data.generate_size=96",
                             f"rollout.max_tokens={args.max_tokens}", "data.max_prompt_tokens=256",
                             "rollout.vllm_kv_cache_mb=512"])
    with distributed(), model_parallel(ParallelDims(1, 1)) as layout:
        prepare_run_dir(cfg)
        c = build(cfg, layout)
        params = sum(p.numel() for p in c.policy.module.parameters())
        syncs, probes = [], []
        for _ in range(args.repeats):
            c.policy.version += 1  # as after an update
            syncs.append(c.generator.sync())
            t0 = time.perf_counter()
            c.generator._probe_diff()
            probes.append(time.perf_counter() - t0)
        prompts = [c.source.take(i, 1)[0].ids for i in range(args.prompts)]
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=0)
        gen = {}
        for backend, g in (("vllm", c.generator), ("native", MegatronGenerator(c.policy.module, c.arch))):
            g.generate(prompts[:1], 1, SamplingParams(max_tokens=2, temperature=1.0))  # warm-up
            t0 = time.perf_counter()
            outs = g.generate(prompts, args.samples, sampling)
            seconds = time.perf_counter() - t0
            tokens = sum(len(s.token_ids) for o in outs for s in o)
            gen[backend] = {"seconds": round(seconds, 3), "generated_tokens": tokens,
                            "tokens_per_s": round(tokens / seconds, 1)}
        t0 = time.perf_counter()
        c.policy.export_hf(work / "hf")  # the other way out of Megatron: an HF directory on disk
        export_s = time.perf_counter() - t0
        c.generator.close()
    sync_s = statistics.median(s["sync/seconds"] for s in syncs)
    probe_s = statistics.median(probes)
    nbytes = syncs[0]["sync/bytes"]
    return {"model": name, "params": params, "dtype": "float32", "threads": torch.get_num_threads(),
            "sync_bytes": int(nbytes), "sync_seconds": round(sync_s, 3), "probe_seconds": round(probe_s, 3),
            "stream_seconds": round(sync_s - probe_s, 3),
            "stream_gb_per_s": round(nbytes / max(sync_s - probe_s, 1e-9) / 1e9, 3),
            "probe_diff_max": max(s["sync/probe_diff_max"] for s in syncs),
            "export_hf_seconds": round(export_s, 3), "prompts": args.prompts, "samples": args.samples,
            "max_tokens": args.max_tokens, "generation": gen,
            "vllm_speedup_vs_native": round(gen["vllm"]["tokens_per_s"] / gen["native"]["tokens_per_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[*SIZES, "smollm2"], choices=[*SIZES, "smollm2"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_model(args.one, args, args.work)), flush=True)
        return
    from results_io import run_one, write_result

    rows = []
    for name in args.models:
        # Made and removed here, not in the child: a child killed at its time limit leaves no GB of model files behind
        with tempfile.TemporaryDirectory(prefix="megarl-bench-") as work:
            rows.append(run_one([sys.executable, __file__, "--one", name, "--work", work, "--repeats",
                                 str(args.repeats), "--prompts", str(args.prompts), "--samples", str(args.samples),
                                 "--max-tokens", str(args.max_tokens)], {"model": name}))
        print(json.dumps(rows[-1]), flush=True)

    print(f"wrote {write_result('rollout', rows, sys.argv[1:])}")


if __name__ == "__main__":
    main()
