"""One policy-gradient training step (forward, backward, optimizer) of Qwen2.5-shaped Megatron models with random
weights: tokens/s and model FLOPs utilisation against the device's measured matmul peak.

    .venv/bin/python bench/train_step.py                          # CPU: the shapes that fit, at TP=1 and TP=2
    .venv/bin/python bench/train_step.py --shapes qwen2.5-0.5b --impl auto --tp 2 --sp --file train_step_sp
    python bench/train_step.py --rows 16 --prompt 512 --response 512       # a GPU: every shape

Each (shape, kernels.impl, TP) runs in fresh processes (TP > 1: torchrun with TP ranks, one per GPU on CUDA, the
host's cores split between them on CPU): the model is built (fp32 on CPU, bf16 on CUDA), then --steps GRPO
updates (MegatronPolicy.train_step, the trainer's own update: vocab-parallel log-probs, loss, megatron-core
DDP + AdamW) of --rows sequences of --prompt + --response tokens after one warm-up step. Reported:

    tokens_per_s   (prompt + response tokens) / seconds per step, median of the timed steps
    mfu            6 * params * tokens_per_s / peak; params excludes the embedding when it is not also the output
                   layer's input-independent matmul (attention's quadratic term is not counted: short sequences)
    peak_flops     the measured matmul rate of the hardware the ranks use (fp32 4096^3 on CPU, bf16 8192^3 on
                   CUDA; every rank at once, summed): the baseline every MFU is relative to, not a datasheet number
    peak_memory    per rank, the largest: CPU peak RSS of the process; CUDA torch.cuda.max_memory_allocated
    vs_tp1         tokens/s over the TP=1 row of the same shape and impl (the TP=1 baseline)
    *_vs_no_sp     with --sp, each TP > 1 layout is measured again with sequence parallelism (parallel.sp): its
                   tokens/s and peak memory over the same layout without it
    *_vs_torch     tokens/s and peak memory over the same layout with kernels.impl=torch (the naive baseline: the
                   output layer's fp32 logits for every position, then the plain-torch log-softmax)

A shape whose weights + gradients + Adam state (16 bytes per parameter in fp32) would not fit the host memory is
recorded as skipped with that estimate instead of being run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = {  # the Qwen2.5 configs (hidden, layers, heads, kv heads, intermediate, tied embeddings)
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, True),
    "qwen2.5-3b": (2048, 36, 16, 2, 11008, True),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, False),
}
VOCAB = 151_936


def hf_config(shape: str) -> dict:
    h, layers, heads, kv, inter, tied = SHAPES[shape]
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": h,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "tie_word_embeddings": tied}


def param_count(shape: str) -> int:
    h, layers, heads, kv, inter, tied = SHAPES[shape]
    d = h // heads
    per_layer = h * (heads * d) + 2 * h * (kv * d) + (heads + 2 * kv) * d + heads * d * h + 3 * h * inter + 2 * h
    return layers * per_layer + VOCAB * h * (1 if tied else 2) + h


def matmul_peak(device: str) -> float:
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (4096, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def one_shape(shape: str, args) -> dict | None:
    """Measure one shape at --tp on this rank; the result on global rank 0, None on the others."""
    import resource

    import torch
    import torch.distributed as dist

    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.backends.megatron.policy import MegatronPolicy
    from megarl.convert.arch import read_arch
    from megarl.distributed import all_reduce_sum, distributed
    from megarl.losses import build_loss
    from megarl.rollout.batch import Rollouts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    arch = read_arch(hf_config(shape))
    with distributed() as info, model_parallel(ParallelDims(args.tp, 1)):
        model = build_model(arch, dtype=dtype, recompute=args.recompute, sequence_parallel=args.sp_on)
        optim = dict(name="adamw", lr=1e-6, min_lr=0.0, weight_decay=0.01, betas=(0.9, 0.999), grad_clip=1.0,
                     distributed=False, warmup_steps=0, schedule="constant")
        policy = MegatronPolicy(model, arch, optim, args.steps + 1, kernel_impl=args.impl)
        g = torch.Generator().manual_seed(0)
        rows, p, r = args.rows, args.prompt, args.response
        ro = Rollouts([torch.randint(0, VOCAB, (p,), generator=g).tolist() for _ in range(rows)],
                      [torch.randint(0, VOCAB, (r,), generator=g).tolist() for _ in range(rows)],
                      [[0.0] * r for _ in range(rows)], ["length"] * rows,
                      torch.arange(rows, dtype=torch.int64) // max(1, rows // 2))
        ro.rewards = torch.randn(rows, generator=g, dtype=torch.float64)
        ro.old_logprobs = torch.full((rows, r), -5.0)
        ro.advantages = torch.randn(rows, r, generator=g)
        loss = build_loss("grpo", kl_coef=0.0)
        groups = ro.groups()
        times = []
        for step in range(args.steps + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            policy.train_step(ro, groups, loss, args.micro_batch_tokens, 1.0)
            if device == "cuda":
                torch.cuda.synchronize()
            if step:  # the first step warms up (allocations, kernel selection)
                times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        memory = torch.cuda.max_memory_allocated() if device == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del policy, model
        dist.barrier()  # every rank measures at once: the rate of the hardware the TP ranks share
        peak = matmul_peak(device)
        # the slowest rank's step time and largest memory; the matmul peak and memory summed over the ranks
        worst = all_reduce_sum({"seconds": seconds, "memory": memory}, op=dist.ReduceOp.MAX)
        total = all_reduce_sum({"peak": peak, "memory": memory})
        seconds, memory, peak, memory_total = worst["seconds"], worst["memory"], total["peak"], total["memory"]
        if info.rank:
            return None
    tokens = rows * (p + r)
    n = param_count(shape)
    return {"shape": shape, "tp": args.tp, "sp": args.sp_on, "impl": args.impl, "recompute": args.recompute,
            "params": n,
            "dtype": str(dtype).replace("torch.", ""), "rows": rows, "prompt": p, "response": r,
            "tokens_per_step": tokens, "step_seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "model_flops_per_s": round(6 * n * tokens / seconds / 1e9, 2),
            "peak_matmul_gflops": round(peak / 1e9, 1), "mfu": round(6 * n * tokens / seconds / peak, 4),
            "peak_memory_gib": round(memory / 2 ** 30, 2), "total_memory_gib": round(memory_total / 2 ** 30, 2),
            "threads_per_rank": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tp", type=int, nargs="+", default=None,
                    help="tensor-parallel sizes; default 1 and 2 on CPU, 1 and every power of 2 up to the GPUs")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=448)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--micro-batch-tokens", type=int, default=1024)
    ap.add_argument("--impl", nargs="+", default=["auto", "torch"],
                    choices=["auto", "fused_linear", "triton", "torch", "te"],
                    help="kernels.impl of the policy: auto = the output layer fused into the log-prob kernel, from "
                         "hidden states; torch = logits for every position, then the plain-torch kernel (baseline)")
    ap.add_argument("--recompute-shapes", nargs="*", default=[], choices=list(SHAPES),
                    help="shapes trained with model.recompute=full (activation recomputation: what lets 7B at long "
                         "sequences fit one GPU; MFU still counts 6 x params x tokens)")
    ap.add_argument("--sp", action="store_true", help="also measure every TP > 1 layout with sequence parallelism")
    ap.add_argument("--file", default=None, help="results file name (default train_step)")
    ap.add_argument("--recompute", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--sp-on", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.tp, args.impl = (args.tp[0] if args.tp else 1), args.impl[0]
        result = one_shape(args.one, args)
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return
    import psutil
    import torch

    from results_io import run_one, write_result

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    tps = args.tp or ([1, 2] if device == "cpu" else [t for t in (1, 2, 4, 8) if t <= gpus])
    rows = []
    layouts = [(s, i, t, sp) for s in args.shapes for i in args.impl for t in tps
               for sp in ([False, True] if args.sp and t > 1 else [False])]
    for shape, impl, tp, sp in layouts:
        # fp32 weights, grads, two Adam moments, split over the TP ranks of one host, + activations per rank
        need = 16 * param_count(shape) + (4 << 30) * tp
        if device == "cpu" and need > psutil.virtual_memory().total:
            rows.append({"shape": shape, "tp": tp, "impl": impl, "params": param_count(shape), "skipped":
                         f"needs ~{need / 2**30:.0f} GiB (16 bytes/param + 4 GiB per rank) > "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB host memory"})
        elif device == "cuda" and tp > gpus:
            rows.append({"shape": shape, "tp": tp, "impl": impl, "params": param_count(shape),
                         "skipped": f"TP={tp} needs {tp} GPUs; {gpus} here"})
        else:
            one = [__file__, "--one", shape, "--tp", str(tp), "--rows", str(args.rows), "--prompt",
                   str(args.prompt), "--response", str(args.response), "--steps", str(args.steps),
                   "--micro-batch-tokens", str(args.micro_batch_tokens), "--impl", impl,
                   "--recompute", "full" if shape in args.recompute_shapes else "none", *(["--sp-on"] if sp else [])]
            launch = [sys.executable] if tp == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp)]
            rows.append(run_one(launch + one, {"shape": shape, "tp": tp, "sp": sp, "impl": impl}))
        print(json.dumps(rows[-1]), flush=True)
        _compare(rows)
        write_result("train_step", rows, sys.argv[1:], complete=False, file=args.file)
    print(f"wrote {write_result('train_step', rows, sys.argv[1:], file=args.file)}")


def _compare(rows: list[dict]) -> None:
    """vs_tp1, speed_vs_torch and memory_vs_torch of each measured row, against the rows measured so far."""
    def find(shape, tp, impl, sp=False):
        return next((b for b in rows if (b["shape"], b["tp"], b["impl"], b.get("sp", False)) == (shape, tp, impl, sp)
                     and "tokens_per_s" in b), None)

    for r in rows:
        if "tokens_per_s" not in r:
            continue
        if base := find(r["shape"], 1, r["impl"]):
            r["vs_tp1"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        if r.get("sp") and (base := find(r["shape"], r["tp"], r["impl"])):
            r["speed_vs_no_sp"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            r["memory_vs_no_sp"] = round(r["peak_memory_gib"] / base["peak_memory_gib"], 3)
        if (base := find(r["shape"], r["tp"], "torch", r.get("sp", False))) and r["impl"] != "torch":
            r["speed_vs_torch"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            r["memory_vs_torch"] = round(r["peak_memory_gib"] / base["peak_memory_gib"], 3)


if __name__ == "__main__":
    main()
