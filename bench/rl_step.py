"""A full RL step broken down by phase, and A*-PO (one sample per prompt) against GRPO (n=8) at the same number of
prompts per step: per-step time and peak memory (the A*-PO paper reports ~2x faster steps and ~30% less memory);
and GRPO with ``algo.bypass_old_logprobs=true`` (the sampler's log-probs as pi_old, no old-log-prob pass).

    .venv/bin/python bench/rl_step.py                 # CPU: the bundled SmolLM2-135M on generated arithmetic
    python bench/rl_step.py --model /ckpt/Qwen2.5-1.5B-Instruct --max-tokens 1024   # a GPU machine

Each algorithm runs `megarl train` in a fresh process for --steps steps (rollouts with the default backend:
vLLM when installed); the phase times are the medians over steps 2.. of metrics.jsonl (step 1 includes one-off
start-up work such as the first weight sync). A*-PO's offline stage 1 (V* from 8 reference samples per prompt)
runs before, as its own `megarl vstar` process, and is reported separately: it is paid once per dataset, not per
step. Peak memory is the training process's peak RSS on CPU (os.wait4), which also holds the vLLM engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALGOS = {  # what differs per algorithm; the rest is shared
    "grpo": ["algo.loss=grpo", "rollout.group_size=8"],
    "astar_po": ["algo.loss=astar_po", "rollout.group_size=1"],
    "grpo_bypass": ["algo.loss=grpo", "rollout.group_size=8", "algo.bypass_old_logprobs=true"],
}


def megarl(*args: str) -> tuple[float, float]:
    """Run ``megarl ARGS`` in a fresh process; (seconds, peak RSS GiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "megarl.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"megarl {' '.join(args)} failed:\n{out[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20


def run_algos(work: Path, args) -> list[dict]:
    """Train every algorithm in ALGOS under `work`; one row each."""
    common = [f"model.hf_dir={args.model}", "data.generate=arithmetic", "data.generate_size=32",
              f"rollout.max_tokens={args.max_tokens}", f"train.prompts_per_step={args.prompts}",
              f"train.steps={args.steps}", "reward.num_workers=0", "metrics.progress=false",
              "checkpoint.export_hf=false", "optim.lr=1e-6"]
    rows = []
    for algo, overrides in ALGOS.items():
        run = work / algo
        row: dict = {"algo": algo, "group_size": int(overrides[1].split("=")[1]), "prompts_per_step": args.prompts}
        extra = []
        if algo == "astar_po":  # stage 1 once, then train on its output
            seconds, rss = megarl("vstar", *common, *overrides, f"run.dir={run}")
            row["stage1_seconds"], row["stage1_peak_rss_gib"] = round(seconds, 1), round(rss, 2)
            extra = [f"data.train_files={run / 'vstar' / 'train.parquet'}"]
        seconds, rss = megarl("train", *common, *overrides, *extra, f"run.dir={run}")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timed = metrics[1:] or metrics
        phases = sorted({k for m in timed for k in m if k.startswith("time/") and k != "time/step"})
        row["phases"] = {p[5:]: round(statistics.median(m.get(p, 0.0) for m in timed), 3) for p in phases}
        row["step_seconds"] = round(statistics.median(m["time/step"] for m in timed), 3)
        row["peak_rss_gib"] = round(rss, 2)
        row["process_seconds"] = round(seconds, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step, the same for every algorithm")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="megarl-rl-step-") as work:  # ~3 GB of runs and checkpoints
        rows = run_algos(Path(work), args)
    grpo = rows[0]
    for r in rows:
        r["vs_grpo_time"] = round(r["step_seconds"] / grpo["step_seconds"], 3)
        r["vs_grpo_memory"] = round(r["peak_rss_gib"] / grpo["peak_rss_gib"], 3)
    from results_io import write_result

    model = "SmolLM2-135M-Instruct (fp32)" if args.model == "bundled:smollm2" else args.model
    print(f"wrote {write_result('rl_step', rows, sys.argv[1:], model=model, timed_steps=f'2-{args.steps}')}")


if __name__ == "__main__":
    main()
