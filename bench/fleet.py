"""The Ray rollout fleet (rollout.placement=ray) against colocated vLLM: weight-sync time and bytes per parameter
by model size, and a training step with the trainer and the engine on separate cores against both sharing all.

    .venv/bin/python bench/fleet.py                         # CPU: writes bench/results/cpu/fleet.json
    python bench/fleet.py --models smollm2 --steps 6        # any subset

Each (model, placement) is one `megarl train` run in a fresh process: --steps steps of the arithmetic task at
TP=1 with one engine (colocated: in the trainer's process; ray: an actor on a local cluster the run starts). The
models are bench/rollout.py's: random Qwen2 shapes of hidden size 128/256/512 (4 layers, SmolLM2's vocabulary)
and the bundled SmolLM2-135M-Instruct. From metrics.jsonl, over steps 2..N (step 1 holds the warm-ups): the
median sync/seconds and time/step, sync/bytes, and bytes per parameter.

Cores (--pin, on when the machine has at least two): colocated, the trainer (and so its engine) may use every
core; fleet, the trainer is pinned to the first half of the cores and the engine's workers, once they appear, to
the other half (set from here with psutil, as taskset would). Times are ratios within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rollout import SIZES, model_dir  # noqa: E402  (the same model shapes)

REPO = Path(__file__).resolve().parents[1]


def is_engine(p) -> bool:
    import psutil

    try:
        return " ".join(p.cmdline()).startswith("ray::EngineWorker")
    except psutil.Error:
        return False


def launch(cmd: list[str], trainer_cores: list[int], engine_cores: list[int], pin: bool,
           stdout=subprocess.PIPE) -> subprocess.Popen:
    """``cmd`` started on ``trainer_cores``; with ``pin``, its Ray engine workers moved to ``engine_cores`` as soon
    as they appear (they inherit the trainer's cores). Returns once they are moved (or the run ended)."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, trainer_cores))
    pinned = not pin
    while proc.poll() is None and not pinned:
        engines = [p for p in psutil.Process(proc.pid).children(recursive=True) if is_engine(p)]
        for p in engines:
            p.cpu_affinity(engine_cores)
            for t in p.threads():  # threads started before the move keep their own mask
                try:
                    os.sched_setaffinity(t.id, engine_cores)
                except OSError:
                    pass
        pinned = bool(engines)
        time.sleep(0.2)
    return proc


def one_run(name: str, model: str, placement: str, args, work: Path) -> dict:
    run_dir = work / f"{name}-{placement}"
    cmd = [sys.executable, "-m", "megarl.cli", "train", f"model.hf_dir={model}",
           f"run.dir={run_dir}", "rollout.backend=vllm", f"rollout.placement={placement}", "data.generate=arithmetic",
           "data.generate_size=96", f"train.steps={args.steps}", "train.prompts_per_step=4", "rollout.group_size=4",
           f"rollout.max_tokens={args.max_tokens}", "data.max_prompt_tokens=256", "rollout.vllm_kv_cache_mb=512",
           "reward.num_workers=0", "checkpoint.interval=0", "checkpoint.export_hf=false", "eval.interval=0",
           "metrics.progress=false"]
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    trainer_cores, engine_cores = (cores[:half], cores[half:]) if args.pin and placement == "ray" else (cores, cores)
    t0 = time.perf_counter()
    proc = launch(cmd, trainer_cores, engine_cores, pin=args.pin and placement == "ray")
    out = proc.communicate()[0]
    if proc.returncode:
        return {"model": name, "placement": placement, "error": out[-1500:]}
    from megarl.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")[1:]
    nbytes = rows[0]["sync/bytes"]
    return {"model": name, "placement": placement, "params": parameters(name, work),
            "steps_measured": len(rows),
            "trainer_cores": len(trainer_cores), "engine_cores": len(engine_cores),
            "sync_bytes": int(nbytes), "sync_seconds": round(statistics.median(r["sync/seconds"] for r in rows), 3),
            "step_seconds": round(statistics.median(r["time/step"] for r in rows), 3),  # sync included
            "generate_seconds": round(statistics.median(r.get("time/generation", 0.0) for r in rows), 3),
            "run_seconds": round(time.perf_counter() - t0, 1),
            "probe_diff_max": max(r["sync/probe_diff_max"] for r in rows)}


def parameters(name: str, work: Path) -> int:
    """The model's parameter count, from its HF checkpoint (a tied output layer counted once)."""
    from safetensors import safe_open

    if name == "smollm2":
        from megarl.convert.bundled import materialize_smollm2

        folder = materialize_smollm2()
    else:
        folder = work / name
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[*SIZES, "smollm2"], choices=[*SIZES, "smollm2"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=len(os.sched_getaffinity(0)) >= 2)
    args = ap.parse_args()
    from results_io import write_result

    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="megarl-bench-") as work:
            model = model_dir(name, Path(work))
            for placement in ("colocated", "ray"):
                rows.append(one_run(name, model, placement, args, Path(work)))
                print(json.dumps(rows[-1]), flush=True)
                base = next((r for r in rows if r["model"] == name and r["placement"] == "colocated"
                             and "error" not in r), None)
                if "error" not in rows[-1]:
                    rows[-1]["sync_bytes_per_param"] = round(rows[-1]["sync_bytes"] / rows[-1]["params"], 2)
                if placement == "ray" and base and "error" not in rows[-1]:
                    for k in ("sync_seconds", "step_seconds"):
                        rows[-1][f"{k}_vs_colocated"] = round(rows[-1][k] / base[k], 3)
                write_result("fleet", rows, sys.argv[1:], complete=False)
    print(f"wrote {write_result('fleet', rows, sys.argv[1:])}")


if __name__ == "__main__":
    main()
