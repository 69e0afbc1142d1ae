"""``megarl demo --algo all``: every algorithm family of the demo at the same budget, side by side.

Each family runs as its own ``megarl demo --algo A`` process (a fresh interpreter: Megatron's process groups and a
vLLM engine are made once per process) into ``RUN/A`` with the same settings, steps and held-out problems, then
the comparison is written to ``RUN``:

    compare.png   held-out avg@k against the RL step and against wall time, and the training reward per step
    compare.md    per family: held-out avg@k at every evaluation, final pass@k, training reward over the first
                  and last 5 steps, median seconds per step, peak resident memory, samples generated (A*-PO's
                  stage-1 samples and DAPO's dropped groups included)
    compare.json  the same numbers

A family whose record (``RUN/A/compare_record.json``) says it finished is not run again, so an interrupted
comparison resumes where it stopped. Peak memory is the largest resident set of the family's process tree
(``wait4``'s ru_maxrss, what ``/usr/bin/time -v`` reports).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megarl.demo import ALGOS

DEFAULT_DIR = "runs/demo-all"


def _run_family(algo: str, run: Path, overrides: list[str]) -> dict:
    """One family's demo in a child process; its wall time and peak RSS."""
    cmd = [sys.executable, "-m", "megarl.cli", "demo", "--algo", algo, f"run.dir={run}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
            "peak_rss_gib": usage.ru_maxrss / 2**20}  # ru_maxrss is in KiB on Linux


def family_record(algo: str, run: Path, proc: dict) -> dict:
    """What the comparison reports of one finished family run (module docstring)."""
    import yaml

    from megarl.data.parquet import read_rows
    from megarl.metrics import read_metrics

    rows, evals = read_metrics(run / "metrics.jsonl"), read_metrics(run / "eval.jsonl")
    group_size = yaml.safe_load((run / "config.yaml").read_text())["rollout"]["group_size"]
    # generated, not kept: DAPO's dynamic sampling draws further groups and drops the uninformative ones
    generated = sum(r.get("rollout/sampled_groups", r["rollout/groups"]) * group_size for r in rows)
    vstar = sum(len(r["extra_info"]["v_star_rewards"]) for f in sorted((run / "vstar").glob("*.parquet"))
                for r in read_rows(f))  # A*-PO stage 1: reference samples, counted as samples used
    avg = {e["step"]: v for e in evals for k, v in e.items() if "/avg@" in k}
    passk = {e["step"]: v for e in evals for k, v in e.items() if "/pass@" in k}
    first, last = rows[:5], rows[-5:]
    return {"algo": algo, "overrides": ALGOS[algo], "steps": len(rows), **proc,
            "avg_at_k": avg, "pass_at_k": passk,
            "reward_first5": statistics.fmean(r["reward/mean"] for r in first),
            "reward_last5": statistics.fmean(r["reward/mean"] for r in last),
            "step_s_median": statistics.median(r["time/step"] for r in rows),
            "elapsed_s": [sum(r["time/step"] for r in rows[:i + 1]) for i in range(len(rows))],
            "reward": [r["reward/mean"] for r in rows],
            "samples": int(generated) + vstar, "vstar_samples": vstar}


def table(records: list[dict]) -> str:
    """compare.md's table (module docstring)."""
    steps = sorted({int(s) for r in records for s in r["avg_at_k"]})
    head = ["family", *[f"avg@k {s}" for s in steps], "pass@k end", "reward 1-5", "reward last 5", "s/step",
            "peak RSS GiB", "samples"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        avg = {int(k): v for k, v in r["avg_at_k"].items()}
        end = r["pass_at_k"][max(r["pass_at_k"], key=int)] if r["pass_at_k"] else float("nan")
        cells = [r["algo"], *[f"{avg[s]:.3f}" if s in avg else "" for s in steps], f"{end:.3f}",
                 f"{r['reward_first5']:.3f}", f"{r['reward_last5']:.3f}", f"{r['step_s_median']:.1f}",
                 f"{r['peak_rss_gib']:.1f}", str(r["samples"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(records: list[dict]):
    """compare.png: held-out avg@k by step and by wall time, training reward by step; one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time, reward) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, r in enumerate(records):
        color = f"C{i % 10}"
        pts = sorted((int(k), v) for k, v in r["avg_at_k"].items())
        clock = [0.0, *r["elapsed_s"]]
        by_step.plot([s for s, _ in pts], [v for _, v in pts], marker="o", color=color, label=r["algo"])
        by_time.plot([clock[s] / 60 for s, _ in pts], [v for _, v in pts], marker="o", color=color)
        reward.plot(range(1, len(r["reward"]) + 1), r["reward"], color=color, alpha=0.8, label=r["algo"])
    for ax, title, x in ((by_step, "held-out avg@k", "RL step"), (by_time, "held-out avg@k", "training minutes"),
                         (reward, "training reward (mean)", "RL step")):
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    reward.legend(fontsize=8)
    fig.suptitle("megarl demo --algo all: SmolLM2-135M-Instruct on arithmetic, same steps and held-out problems")
    fig.tight_layout()
    return fig


def run_all(overrides: list[str] = (), algos: list[str] | None = None) -> int:
    """Every family (or ``algos``) in turn, then the comparison files; returns 1 if any family failed."""
    import matplotlib.pyplot as plt

    overrides = list(overrides)
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("run.dir=")]
    root = Path(given[-1] if given else DEFAULT_DIR)
    overrides = [o for o in overrides if not o.startswith("run.dir=")]
    root.mkdir(parents=True, exist_ok=True)
    records, failed = [], []
    for i, algo in enumerate(algos or list(ALGOS)):
        run, rec_path = root / algo, root / algo / "compare_record.json"
        done = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
        if done.get("overrides_given") == overrides:  # finished: its numbers again, from its run folder
            print(f"demo all: {algo} already done ({rec_path})", flush=True)
            proc = {k: done[k] for k in ("returncode", "wall_s", "peak_rss_gib")}
        else:
            print(f"\ndemo all: family {i + 1}/{len(algos or ALGOS)}: {algo}", flush=True)
            proc = _run_family(algo, run, overrides)
        if proc["returncode"] != 0:
            failed.append(algo)
            continue
        rec = {**family_record(algo, run, proc), "overrides_given": overrides}
        tmp = rec_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(rec_path)
        records.append(rec)
    if records:
        (root / "compare.json").write_text(json.dumps(records, indent=1))
        (root / "compare.md").write_text(table(records) + "\n")
        fig = figure(records)
        fig.savefig(root / "compare.png", dpi=100)
        plt.close(fig)
        print(f"\n{table(records)}\n\ncomparison   {root / 'compare.md'}\nplot         {root / 'compare.png'}")
    if failed:
        print(f"demo all: failed: {', '.join(failed)} (their output is above)", file=sys.stderr)
    return 1 if failed else 0
