"""Context parallelism (parallel.cp): peak memory per rank and time of one policy update on one long sequence, at
CP=1 and CP=2 (torchrun, one process per rank), in one run.

    .venv/bin/python bench/context_parallel.py               # CPU: SmolLM2-width, 4 layers, 4k and 8k tokens
    python bench/context_parallel.py --tokens 32768 --layers 24 --hidden 896 --cps 1 2 4    # a node of 4+ GPUs

The model has SmolLM2-135M's width, vocabulary and head layout with --layers layers and random weights. A row is
one prompt of tokens / 8 and a response of the rest, trained with GRPO's loss through
``MegatronPolicy.train_step`` (the trainer's own update: fused output layer, Megatron DDP, AdamW), with
``model.recompute`` = --recompute. Peak memory: each rank's peak RSS (CPU) or max_memory_allocated (CUDA), the
largest over the ranks; time: the fastest of --steps updates after one warm-up. On CPU megarl's local-spec CP
attention gathers K/V over the group (docs/context_parallel.md): each rank's attention scores are [S/cp, S], so
memory per rank should fall by about cp where attention dominates; on GPUs with Transformer Engine the ring
exchange also avoids holding the whole K/V.
"""

from __future__ import annotations

import argparse
import json
import sys


def measure(args) -> dict:
    import torch

    from measure import peak_memory_ranks, timed_updates

    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.backends.megatron.policy import MegatronPolicy
    from megarl.convert.arch import read_arch
    from megarl.distributed import distributed
    from megarl.losses import build_loss
    from megarl.rollout.batch import Rollouts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    (tokens,) = args.tokens  # one length per process
    arch = read_arch({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
                      "hidden_size": args.hidden, "intermediate_size": args.hidden * 8 // 3,
                      "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
                      "num_key_value_heads": args.hidden // 192, "max_position_embeddings": tokens,
                      "rms_norm_eps": 1e-5, "rope_theta": 1e5, "tie_word_embeddings": True})
    g = torch.Generator().manual_seed(0)
    p = tokens // 8
    prompt = torch.randint(0, 49152, (p,), generator=g).tolist()
    response = torch.randint(0, 49152, (tokens - p,), generator=g).tolist()
    ro = Rollouts([prompt], [response], [[0.0] * len(response)], ["stop"], torch.tensor([0]))
    ro.rewards = torch.ones(1, dtype=torch.float64)
    ro.old_logprobs = torch.full((1, len(response)), -5.0)
    ro.advantages = torch.randn(1, len(response), generator=g)
    with distributed(), model_parallel(ParallelDims(1, 1, args.cp)):
        optim = dict(name="adamw", lr=1e-6, min_lr=0.0, weight_decay=0.01, betas=(0.9, 0.999), grad_clip=1.0,
                     distributed=False, warmup_steps=0, schedule="constant")
        model = build_model(arch, dtype=dtype, recompute=args.recompute)
        policy = MegatronPolicy(model, arch, optim, args.steps + 1, packing=False)
        loss = build_loss("grpo", kl_coef=0.0)
        times, metrics = timed_updates(policy, ro, [[0]], loss, tokens, args.steps)
        peaks = peak_memory_ranks()
    return {"cp": args.cp, "tokens": tokens, "layers": args.layers, "hidden": args.hidden,
            "recompute": args.recompute, "dtype": str(dtype).replace("torch.", ""),
            "update_s": round(min(times), 2), "update_s_all": [round(t, 2) for t in times],
            "peak_memory_gib_per_rank": round(max(peaks) / 2 ** 30, 2),
            "peak_memory_gib_ranks": [round(m / 2 ** 30, 2) for m in peaks],
            "loss": metrics["loss/total"], "grad_norm": metrics["optim/grad_norm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--recompute", default="full", choices=["none", "selective", "full"])
    ap.add_argument("--steps", type=int, default=2, help="timed updates (after one warm-up)")
    ap.add_argument("--cp", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cp:
        from measure import print_result

        print_result(measure(args))
        return
    from results_io import run_one, write_result

    rows = []
    for tokens in args.tokens:
        for cp in args.cps:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cp),
                   __file__, "--cp", str(cp), "--tokens", str(tokens), "--layers", str(args.layers), "--hidden",
                   str(args.hidden), "--recompute", args.recompute, "--steps", str(args.steps)]
            rows.append(run_one(cmd, {"cp": cp, "tokens": tokens}))
            print(json.dumps(rows[-1]), flush=True)
            base = next((r for r in rows if r["tokens"] == tokens and r["cp"] == 1 and "error" not in r), None)
            for r in rows:
                if base and "error" not in r and r["tokens"] == tokens and r is not base:
                    r["memory_vs_cp1"] = round(r["peak_memory_gib_per_rank"] / base["peak_memory_gib_per_rank"], 3)
                    r["update_time_vs_cp1"] = round(r["update_s"] / base["update_s"], 3)
                    r["loss_diff_vs_cp1"] = abs(r["loss"] - base["loss"])
            write_result("context_parallel", rows, sys.argv[1:], complete=False)
    print(f"wrote {write_result('context_parallel', rows, sys.argv[1:])}")


if __name__ == "__main__":
    main()
