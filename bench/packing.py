"""Sequence packing (train.packing) against right-padded micro-batches: a training step and the old/reference
log-prob pass on long-tailed response lengths, in one run, each (distribution, mode) in a fresh process.

    .venv/bin/python bench/packing.py                                     # CPU: SmolLM2-width, 8 layers
    python bench/packing.py --layers 24 --hidden 896 --kv-heads 2 --rows 64  # a GPU: a Qwen2.5-0.5B-sized model

The model has SmolLM2-135M's width, vocabulary and head layout with --layers layers and random weights (the cost of
a step does not depend on the weights). One step's rows are --rows samples in groups of 4 (one prompt each), with
lengths drawn once per distribution (seeded; the same rows for both modes):

    demo       prompts of 45-60 tokens, responses of 4-24 (the CPU demo's measured range: per-step means 7-18,
               maxima up to its max_tokens of 24)
    lognormal  prompts of 64-128 tokens, responses log-normal with median 64, capped at 10x the median (640)
    equal      prompts of 64 and responses of 256 tokens: nothing to save, the packed path's overhead only

Reported per row: the update's and the log-prob pass's tokens/s (real tokens: prompt + response), peak memory
(CPU: the process's peak RSS; CUDA: max_memory_allocated), the padding fraction and the micro-batch count; and,
per distribution, packed over padded. Times are the fastest of --steps calls in each of --repeats processes per
mode, the two modes run alternately (this machine's speed drifts by tens of percent within minutes; noise only
adds time), with every repeat's time kept in the row. The target on a 2-core CPU: >= 1.8x the padded throughput when the padded
batch is at least half padding, >= 0.95x when all samples have the same length. On a GPU with Transformer
Engine, packing runs THD variable-length attention kernels instead of the CPU's block-diagonal mask, so the
attention of a packed micro-batch costs sum(L_i^2) rather than (sum L_i)^2: the GPU gain should be at least the
CPU's (not measured until a GPU runs this bench).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

DISTRIBUTIONS = ("demo", "lognormal", "equal")


def lengths(dist: str, rows: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, response) lengths of one step; a group of 4 shares its prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows // 4):
        p = {"demo": rng.randint(45, 60), "lognormal": rng.randint(64, 128), "equal": 64}[dist]
        for _ in range(4):
            r = {"demo": rng.randint(4, 24), "lognormal": max(1, min(640, round(rng.lognormvariate(4.159, 0.9)))),
                 "equal": 256}[dist]
            out.append((p, r))
    return out


def measure(args) -> dict:
    import resource

    import torch

    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.backends.megatron.policy import MegatronPolicy
    from megarl.convert.arch import read_arch
    from megarl.distributed import distributed
    from megarl.losses import build_loss
    from megarl.rollout.batch import Rollouts
    from megarl.rollout.packing import micro_batches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    arch = read_arch({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
                      "hidden_size": args.hidden, "intermediate_size": args.hidden * 8 // 3,
                      "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
                      "num_key_value_heads": args.kv_heads or args.hidden // 192, "max_position_embeddings": 8192,
                      "rms_norm_eps": 1e-5, "rope_theta": 1e5, "tie_word_embeddings": True})
    shapes = lengths(args.dist, args.rows)
    g = torch.Generator().manual_seed(0)
    prompts, responses, gid = [], [], []
    for i, (p, r) in enumerate(shapes):
        if i % 4 == 0:
            prompt = torch.randint(0, 49152, (p,), generator=g).tolist()
        prompts.append(prompt)
        responses.append(torch.randint(0, 49152, (r,), generator=g).tolist())
        gid.append(i // 4)
    ro = Rollouts(prompts, responses, [[0.0] * len(y) for y in responses], ["stop"] * len(shapes),
                  torch.tensor(gid))
    width = ro.max_response_len
    ro.rewards = torch.randn(len(ro), generator=g, dtype=torch.float64)
    ro.old_logprobs = torch.full((len(ro), width), -5.0)
    ro.advantages = torch.randn(len(ro), width, generator=g)
    packing = args.mode == "packed"
    with distributed(), model_parallel(ParallelDims(1, 1)):
        optim = dict(name="adamw", lr=1e-6, min_lr=0.0, weight_decay=0.01, betas=(0.9, 0.999), grad_clip=1.0,
                     distributed=False, warmup_steps=0, schedule="constant")
        policy = MegatronPolicy(build_model(arch, dtype=dtype), arch, optim, args.steps + 1, packing=packing)
        loss = build_loss("grpo", kl_coef=0.0)
        mbs = micro_batches(ro, ro.groups(), args.micro_batch_tokens, packing=packing)

        def timed(fn) -> float:
            times = []
            for step in range(args.steps + 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                if step:  # the first call warms up
                    times.append(time.perf_counter() - t0)
            return min(times)  # noise on a shared machine only ever adds time

        update = timed(lambda: policy.train_step(ro, ro.groups(), loss, args.micro_batch_tokens, 1.0))
        logprob = timed(lambda: policy.logprobs(ro, args.micro_batch_tokens, 1.0))
        memory = torch.cuda.max_memory_allocated() if device == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    real = sum(p + r for p, r in shapes)
    padded = sum(mb.input_ids.numel() for mb in mbs)
    return {"dist": args.dist, "mode": args.mode, "rows": len(shapes), "real_tokens": real,
            "response_median": statistics.median(r for _, r in shapes), "response_max": max(r for _, r in shapes),
            "micro_batches": len(mbs), "padding_fraction": round(1 - real / padded, 3),
            "update_s": round(update, 3), "update_tokens_per_s": round(real / update, 1),
            "logprob_s": round(logprob, 3), "logprob_tokens_per_s": round(real / logprob, 1),
            "peak_memory_gib": round(memory / 2 ** 30, 2), "dtype": str(dtype).replace("torch.", ""),
            "layers": args.layers, "hidden": args.hidden, "kv_heads": arch.num_kv_heads, "micro_batch_tokens": args.micro_batch_tokens}


def _fastest(runs: list[dict]) -> dict:
    """One row from the repeats of one (distribution, mode): the fastest update and log-prob pass, with every
    repeat's times kept beside them."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    row = dict(ok[0])
    for k in ("update", "logprob"):
        row[f"{k}_s_repeats"] = [r[f"{k}_s"] for r in ok]
        row[f"{k}_s"] = min(row[f"{k}_s_repeats"])
        row[f"{k}_tokens_per_s"] = round(row["real_tokens"] / row[f"{k}_s"], 1)
    row["peak_memory_gib"] = max(r["peak_memory_gib"] for r in ok)
    return row


def _compare(rows: list[dict]) -> None:
    """packed / padded ratios, on the packed row of each distribution."""
    by = {(r["dist"], r["mode"]): r for r in rows if "error" not in r}
    for (dist, mode), r in by.items():
        base = by.get((dist, "padded"))
        if mode == "packed" and base:
            for k in ("update_tokens_per_s", "logprob_tokens_per_s", "peak_memory_gib"):
                r[f"{k}_vs_padded"] = round(r[k] / base[k], 3) if base[k] else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dists", nargs="+", default=list(DISTRIBUTIONS), choices=DISTRIBUTIONS)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--kv-heads", type=int, default=0, help="key/value heads (default: hidden / 192, SmolLM2's)")
    ap.add_argument("--steps", type=int, default=3, help="timed calls per process (after one warm-up)")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2, help="processes per (distribution, mode), run alternately")
    ap.add_argument("--file", default=None, help="results file name (default packing)")
    ap.add_argument("--dist", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dist:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    from results_io import run_one, write_result

    rows = []
    for dist in args.dists:
        runs: dict[str, list[dict]] = {"padded": [], "packed": []}
        for _ in range(args.repeats):  # alternating, so a slow spell of the machine hits both modes
            for mode in runs:
                cmd = [sys.executable, __file__, "--dist", dist, "--mode", mode, "--rows", str(args.rows),
                       "--layers", str(args.layers), "--hidden", str(args.hidden), "--kv-heads", str(args.kv_heads),
                       "--steps", str(args.steps),
                       "--micro-batch-tokens", str(args.micro_batch_tokens)]
                runs[mode].append(run_one(cmd, {"dist": dist, "mode": mode}))
                print(json.dumps(runs[mode][-1]), flush=True)
        rows += [_fastest(runs[mode]) for mode in runs]
        _compare(rows)
        write_result("packing", rows, sys.argv[1:], complete=False, file=args.file)
    print(f"wrote {write_result('packing', rows, sys.argv[1:], file=args.file)}")


if __name__ == "__main__":
    main()
