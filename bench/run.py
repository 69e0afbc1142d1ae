"""The performance suite's one entry point: run the benchmarks (each writes bench/results/<device>/<name>.json
with device, commit, command and versions), then regenerate bench/results/<device>/SUMMARY.md.

    .venv/bin/python bench/run.py                      # all but the demo runs (CPU: about 15 minutes on 2 cores)
    .venv/bin/python bench/run.py demo_all             # every demo family (CPU: 49 minutes at train.steps=15)
    .venv/bin/python bench/run.py rollout train_step   # some
    python bench/run.py --list

On a GPU machine the same command measures the GPU paths (Triton kernels, bf16, CUDA vLLM when installed);
what is absent there (TE, vLLM) is recorded in each JSON's versions and named in the summary. For a lent GPU
machine with nothing installed, bench/gpu/prepare.sh (here) and bench/gpu/run.sh (there) do it in one call.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {  # name: (script, default arguments, what it measures)
    "logprob_kernels": ("logprob_kernels.py", [], "log-prob/entropy kernels vs naive torch: time, peak memory"),
    "rollout": ("rollout.py", [], "Megatron->vLLM sync and HF export vs model size; vLLM vs native tokens/s"),
    "train_step": ("train_step.py", [], "GRPO update of Qwen2.5-0.5B/1.5B/7B shapes: tokens/s, MFU"),
    "packing": ("packing.py", [], "packed vs right-padded micro-batches on long-tailed lengths: tokens/s, memory"),
    "rl_step": ("rl_step.py", [], "full RL step by phase; A*-PO (n=1) vs GRPO (n=8) time and memory"),
    "demo_all": ("demo_all.py", [], "every algorithm family on the CPU demo: held-out curves, time, memory"),
    "rpg_variants": ("rpg_variants.py", [], "RPG's variants against REINFORCE++ on the CPU demo"),
    "context_parallel": ("context_parallel.py", [], "one update on one 4k/8k-token sequence at CP1 vs CP2: memory"),
    "moe": ("moe.py", [], "a small Qwen3-MoE at EP1 vs EP2: training tokens/s, memory per rank, vLLM sync"),
    "fleet": ("fleet.py", [], "colocated vLLM vs a Ray fleet of one engine: sync and step seconds"),
    "staleness": ("staleness.py", [], "the demo on the Ray fleet, synchronous vs one-step-off"),
    "kk_trpa_grpo": ("kk_trpa_grpo.py", [], "TRPA vs GRPO on generated Knights-and-Knaves (2-3 people)"),
}

# whole training runs: 30-50 minutes each on 2 cores
ON_REQUEST = ("demo_all", "rpg_variants", "fleet", "staleness", "kk_trpa_grpo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"of {', '.join(BENCHES)}; default: all but {', '.join(ON_REQUEST)}")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, (_, _, what) in BENCHES.items():
            print(f"{name:16s} {what}")
        return
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    failed = []
    for name in args.names or [n for n in BENCHES if n not in ON_REQUEST]:
        script, extra, _ = BENCHES[name]
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *extra]).returncode:
            failed.append(name)
    subprocess.run([sys.executable, str(HERE / "summary.py")], check=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
