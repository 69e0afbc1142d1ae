"""TRPA against GRPO on generated Knights-and-Knaves puzzles with 2 and 3 people (TRPA's own task and comparison,
at the size 2 CPU cores can run), each trained once with the same data, model, budget and step size, in one run.

    .venv/bin/python bench/kk_trpa_grpo.py                    # bundled SmolLM2-135M-Instruct, 12 steps each
    .venv/bin/python bench/kk_trpa_grpo.py --sft-steps 32     # the same after a supervised format warm-up
    .venv/bin/python bench/kk_trpa_grpo.py --steps 30 --max-tokens 512 model.hf_dir=/models/Qwen2.5-0.5B-Instruct

The K&K rule reward (megarl/rewards/kk.py) scores a response 3 (right), -0.5 (wrong), -1 (unparseable or empty
answer) or -3 (bad format); TRPA ranks the same responses by preference level (1 right, 2 wrong, 3 unparseable,
4 bad format or cut off) and learns from pairs of different levels, GRPO from the standardised score. Reported
per algorithm: held-out avg@4 and pass@4 on --test puzzles before training and every --eval-interval steps, the
training reward, accuracy, response length and the fraction of responses cut off at --max-tokens per step, and
seconds per step. Extra ``key=value`` arguments override both runs.

The bundled model never writes the <think>/<answer> format unprompted (every sample scores -3: no signal for
either loss). ``--sft-steps N`` first fine-tunes it (``megarl sft``, docs/sft.md) for N steps of 16 worked solutions
of other puzzles (a separate generated set, seed 1) and starts both RL runs from that model.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import REPO, write_result

ALGOS = {"grpo": ["algo.loss=grpo", "algo.loss_hparams={kl_coef: 0}"], "trpa": ["algo.loss=trpa"]}


def record(algo: str, run: Path, wall: float) -> dict:
    sys.path.insert(0, str(REPO))
    from megarl.metrics import read_metrics

    rows, evals = read_metrics(run / "metrics.jsonl"), read_metrics(run / "eval.jsonl")
    return {"algo": algo, "overrides": ALGOS[algo], "steps": len(rows), "wall_s": round(wall, 1),
            "avg_at_4": {e["step"]: v for e in evals for k, v in e.items() if "/avg@" in k},
            "pass_at_4": {e["step"]: v for e in evals for k, v in e.items() if "/pass@" in k},
            "reward": [round(r["reward/mean"], 3) for r in rows],
            "acc": [round(r["reward/acc"], 3) for r in rows],
            "response_length": [round(r["response/length_mean"], 1) for r in rows],
            "cut_off": [round(r["response/clip_ratio"], 3) for r in rows],
            "step_s_median": round(statistics.median(r["time/step"] for r in rows), 1)}


def warm_up(out: Path, steps: int) -> dict:
    """``megarl sft`` of the bundled model on ``16 * steps`` worked K&K solutions (2-3 people, seed 1; not the
    RL puzzles); reused when out/sft/hf exists. Returns what the result rows record about it."""
    data, run = out / "sft_data", out / "sft"
    if not (data / "train.parquet").is_file():
        subprocess.run([sys.executable, "-m", "megarl.cli", "data", "kk", "--out", str(data), "--train",
                        str(16 * steps), "--test", "0", "--people", "2-3", "--seed", "1"], cwd=REPO, check=True)
    t0 = time.perf_counter()
    if not (run / "hf" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "megarl.cli", "sft", f"run.dir={run}", "model.hf_dir=bundled:smollm2",
                        f"data.train_files={data / 'train.parquet'}", f"train.steps={steps}",
                        "train.prompts_per_step=16", "optim.lr=3e-5", "optim.schedule=cosine", "optim.min_lr=3e-6",
                        "optim.warmup_steps=2", "checkpoint.interval=8", "metrics.progress=false"],
                       cwd=REPO, check=True)
    sys.path.insert(0, str(REPO))
    from megarl.metrics import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    return {"model": str(run / "hf"), "steps": steps, "rows": 16 * steps, "lr": "3e-5 cosine to 3e-6",
            "nll": [round(r["loss/nll"], 3) for r in rows], "wall_s": round(sum(r["time/step"] for r in rows), 1),
            "rerun_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "kk-trpa-grpo"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--test", type=int, default=16, help="held-out puzzles")
    ap.add_argument("--eval-interval", type=int, default=4)
    ap.add_argument("--lr", default="3e-5", help="the CPU demo's step size for the same model")
    ap.add_argument("--sft-steps", type=int, default=0, help="supervised format warm-up first (0: none)")
    ap.add_argument("--file", default=None, help="results file name (default kk_trpa_grpo), e.g. for another seed")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    sft = warm_up(out, args.sft_steps) if args.sft_steps else None
    if sft:
        args.overrides = [f"model.hf_dir={sft['model']}", *args.overrides]
    data = out / "data"
    if not (data / "train.parquet").is_file():
        subprocess.run([sys.executable, "-m", "megarl.cli", "data", "kk", "--out", str(data), "--train", "256",
                        "--test", str(args.test), "--people", "2-3"], cwd=REPO, check=True)
    rows = []
    for algo, extra in ALGOS.items():
        run = out / algo
        cmd = [sys.executable, "-m", "megarl.cli", "train", f"run.dir={run}", "model.hf_dir=bundled:smollm2",
               f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
               "rollout.group_size=4", f"rollout.max_tokens={args.max_tokens}", "train.prompts_per_step=4",
               f"train.steps={args.steps}", f"optim.lr={args.lr}", "reward.num_workers=0", "eval.n=4",
               f"eval.interval={args.eval_interval}", "eval.before_train=true", "checkpoint.export_hf=false",
               "metrics.progress=false", *extra, *args.overrides]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO)
        rows.append(record(algo, run, time.perf_counter() - t0) if proc.returncode == 0 else
                    {"algo": algo, "error": f"exit code {proc.returncode}; see the output above"})
        if sft:
            rows[-1]["sft"] = sft
        print(rows[-1], flush=True)
        write_result("kk_trpa_grpo", rows, sys.argv[1:], complete=False, file=args.file)
    print(f"wrote {write_result('kk_trpa_grpo', rows, sys.argv[1:], file=args.file)}")


if __name__ == "__main__":
    main()
