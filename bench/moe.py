"""Expert parallelism (parallel.ep) and TP with sequence parallelism (parallel.tp + parallel.sp): training-step
tokens/s and peak memory per rank of a small Qwen3-MoE at EP=1, EP=2 and TP=2 on the same two ranks, and the time of
one verified weight sync into colocated vLLM engines, in one run.

    .venv/bin/python bench/moe.py                      # CPU: 4 layers, hidden 512, 16 experts of 1024, top 2
    python bench/moe.py --experts 64 --layers 8 --ranks 8 --layouts ep1 ep8 tp2-sp     # a node of GPUs

The ranks train the same global batch (--rows rows of --tokens tokens per rank) with GRPO's loss through
``MegatronPolicy.train_step`` (the trainer's update: Megatron DDP, AdamW; router load-balancing loss on). At
EP=1 each data-parallel rank holds every expert; at EP=2 each holds half and tokens travel to their experts' rank
by all-to-all; at TP=2 (sequence parallel, which megatron-core requires for MoE at tp > 1) the two ranks form one
replica that splits every weight, expert and activation over them and trains the rows of both. Experts hold most
of the weights, so at EP=2 the weights, gradients and Adam moments per rank should fall by close to half. Peak
memory: each rank's peak RSS (CPU) or max_memory_allocated (CUDA) after training, the largest
over the ranks. Sync: ``ColocatedVLLM.sync`` (experts gathered over the EP ranks into their checkpoint names,
streamed into vLLM's in-place reload with the MoE kernel repacked, then the log-prob probe), the fastest of
--steps after one warm-up. The model has random weights written once as an HF checkpoint (SmolLM2's tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def hf_config(args) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 49152,
            "hidden_size": args.hidden, "intermediate_size": args.hidden * 4, "moe_intermediate_size": args.ffn,
            "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64, "num_key_value_heads": 2,
            "head_dim": 64, "num_experts": args.experts, "num_experts_per_tok": args.topk, "norm_topk_prob": True,
            "router_aux_loss_coef": 0.001, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "tie_word_embeddings": False, "eos_token_id": 2}


def write_model(args, out: Path) -> None:
    """A random HF checkpoint of the bench's shape, with SmolLM2's tokenizer (no download)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from megarl.convert.bundled import materialize_smollm2, save_hf_model

    torch.manual_seed(0)
    cfg = hf_config(args)
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    config.architectures = cfg["architectures"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_hf_model(model, out)
    AutoTokenizer.from_pretrained(materialize_smollm2()).save_pretrained(out)


def measure(args) -> dict:
    import torch
    import torch.distributed as dist

    from measure import peak_memory_ranks, timed_updates

    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.backends.megatron.policy import MegatronPolicy
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.backends.vllm.colocated import ColocatedVLLM
    from megarl.convert.arch import read_arch_dir
    from megarl.convert.hf_io import HFReader
    from megarl.distributed import distributed
    from megarl.losses import build_loss
    from megarl.rollout.batch import Rollouts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    arch = read_arch_dir(args.model)
    tp, ep = args.tp, args.ep
    with distributed(), model_parallel(ParallelDims(tp, 1, ep=ep)) as layout:
        # the same global batch at every layout: --rows rows per rank, drawn by the rank's own generator at tp = 1;
        # a TP replica trains the rows of its tp ranks
        p, rows, prompts, responses, advantages = args.tokens // 8, args.rows * tp, [], [], []
        for seed in range(layout.dp_rank * tp, (layout.dp_rank + 1) * tp):
            g = torch.Generator().manual_seed(seed)
            prompts += [torch.randint(0, 49152, (p,), generator=g).tolist() for _ in range(args.rows)]
            responses += [torch.randint(0, 49152, (args.tokens - p,), generator=g).tolist() for _ in range(args.rows)]
            advantages.append(torch.randn(args.rows, args.tokens - p, generator=g))
        ro = Rollouts(prompts, responses, [[0.0] * len(r) for r in responses], ["stop"] * rows,
                      torch.arange(rows))
        ro.rewards = torch.ones(rows, dtype=torch.float64)
        ro.old_logprobs = torch.full((rows, args.tokens - p), -5.0)
        ro.advantages = torch.cat(advantages)
        optim = dict(name="adamw", lr=1e-6, min_lr=0.0, weight_decay=0.01, betas=(0.9, 0.999), grad_clip=1.0,
                     distributed=False, warmup_steps=0, schedule="constant")
        model = build_model(arch, dtype=dtype, init_weights=False, sequence_parallel=tp > 1)
        reader = HFReader(args.model)
        load_hf_weights(model, arch, reader.get)
        reader.close()
        policy = MegatronPolicy(model, arch, optim, 2 * args.steps + 2, packing=False)
        loss = build_loss("grpo", kl_coef=0.0)
        times, metrics = timed_updates(policy, ro, [[i] for i in range(rows)], loss, args.tokens, args.steps)
        peaks, world = peak_memory_ranks(), dist.get_world_size()
        engine = ColocatedVLLM(policy, arch, Path(args.model), tp=tp, dtype=str(dtype).replace("torch.", ""),
                               max_model_len=512, kv_cache_mb=256, gpu_memory_utilization=0.3, probe_tol=None,
                               seed=0, group=layout.model_group)
        syncs = []
        for _ in range(args.steps + 1):
            dist.barrier()
            syncs.append(engine.sync())
        engine.close()
    return {"layout": f"tp{tp}-sp" if tp > 1 else f"ep{ep}", "tp": tp, "ep": ep, "ranks": world,
            "experts": arch.num_experts, "layers": arch.num_layers,
            "hidden": arch.hidden_size, "expert_ffn": arch.moe_ffn_hidden_size, "top_k": arch.moe_top_k,
            "tokens_per_rank": args.rows * args.tokens, "dtype": str(dtype).replace("torch.", ""),
            "update_s": round(min(times), 3), "update_s_all": [round(t, 3) for t in times],
            "tokens_per_s": round(world * args.rows * args.tokens / min(times), 1),
            "peak_memory_gib_per_rank": round(max(peaks) / 2 ** 30, 3),
            "peak_memory_gib_ranks": [round(m / 2 ** 30, 3) for m in peaks],
            "sync_s": round(min(s["sync/seconds"] for s in syncs[1:]), 3),
            "sync_gib": round(syncs[-1]["sync/bytes"] / 2 ** 30, 3),
            "sync_probe_diff_max": max(s["sync/probe_diff_max"] for s in syncs),
            "loss": metrics["loss/total"], "grad_norm": metrics["optim/grad_norm"],
            "load_imbalance": metrics.get("moe/load_imbalance")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["ep1", "ep2", "tp2-sp"],
                    help="epN: experts split N ways over data-parallel ranks; tpN-sp: N-way tensor + sequence parallel")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024, help="each expert's intermediate size")
    ap.add_argument("--rows", type=int, default=4, help="rows per rank")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per row")
    ap.add_argument("--steps", type=int, default=2, help="timed updates and syncs (after one warm-up each)")
    ap.add_argument("--ep", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ep:
        from measure import print_result

        print_result(measure(args))
        return
    import shutil
    import tempfile

    from results_io import write_result

    tmp = tempfile.mkdtemp(prefix="megarl-bench-moe-")
    try:
        rows = run_all(args, Path(tmp) / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {write_result('moe', rows, sys.argv[1:])}")


def run_all(args, model_dir: Path) -> list[dict]:
    from results_io import run_one, write_result

    write_model(args, model_dir)
    rows = []
    for layout in args.layouts:
        tp, ep = (int(layout[2:-3]), 1) if layout.startswith("tp") else (1, int(layout[2:]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
               __file__, "--ep", str(ep), "--tp", str(tp), "--model", str(model_dir), "--rows", str(args.rows),
               "--tokens", str(args.tokens), "--steps", str(args.steps)]
        rows.append(run_one(cmd, {"layout": layout}))
        print(json.dumps(rows[-1]), flush=True)
        base = next((r for r in rows if r["layout"] == "ep1" and "error" not in r), None)
        for r in rows:
            if base and "error" not in r and r is not base:
                r["memory_vs_ep1"] = round(r["peak_memory_gib_per_rank"] / base["peak_memory_gib_per_rank"], 3)
                r["tokens_per_s_vs_ep1"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
                r["sync_time_vs_ep1"] = round(r["sync_s"] / base["sync_s"], 3)
                r["loss_diff_vs_ep1"] = abs(r["loss"] - base["loss"])
        write_result("moe", rows, sys.argv[1:], complete=False)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
