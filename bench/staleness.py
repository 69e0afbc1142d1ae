"""Synchronous against one-step-off RL (rollout.max_staleness 0 and 1; --ks 2 adds lazy weight pushes) on the CPU
demo's task, with the trainer and the Ray fleet's engine on separate cores: wall seconds per step and the learning
curves.

    .venv/bin/python bench/staleness.py                       # CPU: writes bench/results/cpu/staleness.json
    .venv/bin/python bench/staleness.py --seeds 1234 --steps 10
    .venv/bin/python bench/staleness.py --ks 1 --file staleness_rollout_is \
        --extra 'algo.loss_hparams={kl_coef: 0, rollout_is: token}'     # one-step-off with rollout correction
    .venv/bin/python bench/staleness.py --seeds 1234 --steps 15 --ks 0 1 2 --file staleness_k2 \
        --extra 'algo.loss_hparams={kl_coef: 0, rollout_is: token}'     # k = 0, 1, 2 in one run

Each (seed, k) is one ``megarl demo`` run (GRPO's settings, 30 steps, held-out avg@4 every 5 steps) with
``rollout.placement=ray`` and one engine, in a fresh process; the runs alternate k within each seed, so drift of
the machine reaches both. Cores: the trainer is pinned to the first half of the cores, the engine to the other
half (bench/fleet.py's ``launch``). Per step, the wall time between consecutive metrics lines as this script sees
them appear: it counts everything the step made the trainer wait for, the evaluations included (with k = 1 a
step's remaining generation may be waited for inside the evaluation's weight sync rather than in the next
step, so the logged ``time/step`` alone would flatter it). Reported: the median over steps 2..N, the held-out
avg@4 at each evaluation, the training reward per step, mean staleness and queue wait. The run-to-run spread is
that of the seeds at k = 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fleet import launch  # noqa: E402  (the same core pinning)
from results_io import write_result  # noqa: E402


def one_run(seed: int, k: int, args, work: Path) -> dict:
    from megarl.metrics import read_metrics

    run_dir = work / f"seed{seed}-k{k}"
    cmd = [sys.executable, "-m", "megarl.cli", "demo", "--algo", "grpo", f"run.dir={run_dir}", f"run.seed={seed}",
           f"train.steps={args.steps}", "rollout.backend=vllm", "rollout.placement=ray", "rollout.engines=1",
           f"rollout.max_staleness={k}", "checkpoint.interval=0", "checkpoint.export_hf=false",
           "metrics.progress=false", *args.extra]
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    t0 = time.perf_counter()
    with open(work / f"seed{seed}-k{k}.log", "w") as log:
        proc = launch(cmd, cores[:half], cores[half:], pin=len(cores) >= 2, stdout=log)
        seen, stamps = 0, []
        while proc.poll() is None:
            n = len(read_metrics(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").exists() else 0
            stamps += [time.perf_counter()] * (n - seen)
            seen = n
            time.sleep(0.2)
    if proc.returncode:
        return {"seed": seed, "k": k, "error": (work / f"seed{seed}-k{k}.log").read_text()[-1500:]}
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = read_metrics(run_dir / "eval.jsonl")
    walls = [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2..N
    key = next(k for k in evals[0] if k.endswith("avg@4"))
    return {"seed": seed, "k": k, "extra": args.extra, "steps": len(rows), "trainer_cores": half,
            "engine_cores": len(cores) - half,
            "step_wall_seconds_median": round(statistics.median(walls), 3),
            "step_wall_seconds_mean": round(statistics.mean(walls), 3),
            "run_seconds": round(time.perf_counter() - t0, 1),
            "heldout_avg4": {int(e["step"]): round(e[key], 4) for e in evals},
            "reward_mean": [round(r["reward/mean"], 4) for r in rows],
            "staleness_mean": round(statistics.mean(r["rollout/staleness_mean"] for r in rows), 3),
            "steps_with_a_weight_sync": sum("sync/seconds" in r for r in rows),
            "queue_wait_seconds_median": round(statistics.median(r["rollout/queue_wait_seconds"] for r in rows), 3),
            "time_step_logged_median": round(statistics.median(r["time/step"] for r in rows[1:]), 3)}


def summarize(runs: list[dict]) -> dict:
    """Per k: the median of the seeds' per-step medians; the speedup of k = 1; the final held-out spread."""
    ok = [r for r in runs if "error" not in r]
    out = {}
    for k in sorted({r["k"] for r in ok}):
        mine = [r for r in ok if r["k"] == k]
        finals = [r["heldout_avg4"][max(r["heldout_avg4"])] for r in mine]
        out[f"k{k}"] = {"step_wall_seconds": round(statistics.median(r["step_wall_seconds_median"] for r in mine), 3),
                        "final_heldout_avg4": finals}
    for k in sorted({r["k"] for r in ok} - {0}) if "k0" in out else []:
        out[f"speedup_k{k}"] = round(out["k0"]["step_wall_seconds"] / out[f"k{k}"]["step_wall_seconds"], 3)
    if "k0" in out and "k1" in out:
        lo, hi = min(out["k0"]["final_heldout_avg4"]), max(out["k0"]["final_heldout_avg4"])
        out["k0_final_spread"] = round(hi - lo, 4)
        out["k1_final_within_k0_range"] = all(lo <= f <= hi for f in out["k1"]["final_heldout_avg4"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 7])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1], help="rollout.max_staleness values, each >= 0")
    ap.add_argument("--extra", nargs="*", default=[], help="more config overrides for every run (key=value)")
    ap.add_argument("--file", default="staleness", help="results file name (bench/results/<device>/FILE.json)")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="megarl-bench-") as work:
        for seed in args.seeds:
            for k in args.ks:
                runs.append(one_run(seed, k, args, Path(work)))
                print(json.dumps(runs[-1]), flush=True)
                write_result("staleness", runs, sys.argv[1:], complete=False, file=args.file, summary=summarize(runs))
    print(json.dumps(summarize(runs), indent=1))
    print(f"wrote {write_result('staleness', runs, sys.argv[1:], file=args.file, summary=summarize(runs))}")


if __name__ == "__main__":
    main()
