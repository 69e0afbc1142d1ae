"""The CPU demo, the README's first command: RL on the bundled SmolLM2-135M-Instruct, on generated arithmetic.

    megarl demo                          # GRPO; 6-9 minutes on 2 CPU cores (10 without vLLM)
    megarl demo --algo dr_grpo           # any algorithm family of ALGOS
    megarl demo train.steps=10           # any config key (megarl/config.py)

The task: ``a + b`` or ``a - b`` with operands 1..9 under the system prompt "You are a calculator. Reply with the
result only.", scored by the last integer of the answer. Measured before choosing it: the model's greedy answers
to such prompts are right about 3 times in 4, but its samples at temperature 1 only about 1 in 10 (they ramble);
an RL step moves the sampling distribution toward the answers that scored, so the reward rises within minutes.
It is the same trainer as ``megarl train`` (this module only picks the settings), and it ends by writing a PNG of
reward, accuracy and response length per step and printing where everything is.
"""

from __future__ import annotations

import time
from pathlib import Path

# Per algorithm family: what differs from GRPO (the trainer's defaults; each loss brings its own advantage estimator
# and reference, megarl/algo.py). GRPO runs without its KL term here (as
# Dr. GRPO and DAPO do) so the demo needs no reference model pass. Each family's settings were chosen by measured
# runs on the 2-core machine; docs/demo_families.md has those runs and why each setting is there.
ALGOS: dict[str, list[str]] = {
    "grpo": ["algo.loss_hparams={kl_coef: 0}"],
    # Dr. GRPO and RPG: r - mean without the std division; at temperature 1 they learned brevity, then stalled on
    # short wrong answers (too few right ones to learn from); at 0.7 they learn as fast as GRPO. No KL (paper)
    "dr_grpo": ["algo.loss=dr_grpo", "algo.loss_hparams={kl_coef: 0}", "rollout.temperature=0.7"],
    "dapo": ["algo.loss=dapo", "rollout.dynamic_sampling=true"],  # overlong shaping is on for every family
    "trw": ["algo.loss=trw_entropy", "algo.loss_hparams={kl_coef: 0}"],
    "trpa": ["algo.loss=trpa"],  # levels: megarl/rewards/levels.py (a cut-off response ranks last)
    # one sample per prompt (the paper); beta2 scaled to 5-24-token responses (the paper's 1e-3 is for ~1024
    # tokens: at 1e-3 the regression target A/beta2 is hundreds of nats on a few tokens and the policy's entropy
    # ran away); sampled at temperature 0.7, where the model answers right often enough for r - V* to carry signal
    "astar_po": ["algo.loss=astar_po", "rollout.group_size=1", "train.prompts_per_step=16",
                 "algo.loss_hparams={beta2: 0.1}", "rollout.temperature=0.7"],
    "rpg": ["algo.loss=rpg_rf_fkl_clip", "rollout.temperature=0.7"],
    "reinforce_pp": ["algo.loss=reinforce_pp"],
    # the peers' losses (megarl/losses/peers.py) with GRPO's advantages. With one update per step the update is
    # on-policy (ratio 1): their clips never bind. CISPO's gradient is then GRPO's exactly (measured: the same
    # curve); GSPO's averages each response's tokens first, and at temperature 1 it learned brevity and stalled on
    # short wrong answers (held-out 0.06 at step 15) as Dr. GRPO and RPG did; at 0.7 it learns (0.58)
    "gspo": ["algo.loss=gspo", "rollout.temperature=0.7"],
    "cispo": ["algo.loss=cispo"],
    # GMPO and SAPO average each response's tokens first, as GSPO: sampled at 0.7 as GSPO is
    "gmpo": ["algo.loss=gmpo", "rollout.temperature=0.7"],
    "sapo": ["algo.loss=sapo", "rollout.temperature=0.7"],
    # Clip-Cov and KL-Cov: GRPO's token mean, with a few high-covariance tokens' gradients dropped or KL-penalised
    "clip_cov": ["algo.loss=clip_cov"],
    "kl_cov": ["algo.loss=kl_cov"],
}

# The demo's settings beside the defaults, chosen by measuring (runs on the 2-core machine): 4 prompts x 8 samples
# per step; responses of at most 24 tokens with DAPO's overlong penalty over the last 8, which first teaches the
# model to answer briefly (length ~19 -> ~2.5 tokens by step 5, steps get ~2x faster), then the answers get right;
# lr 3e-5 moves the 135M model within 30 steps (5e-5 without the length penalty collapsed onto long rambles), and
# its cosine decay keeps the late steps from undoing the gains (at a constant 3e-5 the reward peaked near step 16
# and fell back to ~0.4 over steps 26-30 as the policy collapsed on the prompts it got wrong). The 12 held-out
# problems are evaluated before training and every 5 steps (avg@4), a steadier signal than 4 prompts per step.
SETTINGS = [
    "model.hf_dir=bundled:smollm2", "data.generate=arithmetic", "data.generate_size=96",
    "rollout.group_size=8", "rollout.max_tokens=24", "rollout.overlong_buffer=8", "train.prompts_per_step=4",
    "train.steps=30", "optim.lr=3e-5", "optim.schedule=cosine", "optim.min_lr=3e-6", "reward.num_workers=0",
    "eval.n=4", "eval.interval=5", "eval.before_train=true",
    "rollout.vllm_kv_cache_mb=384",  # vLLM (when installed): 68 blocks of 128 tokens hold a step's 32 samples
]

PLOTTED = (("reward/mean", "reward (mean)"), ("reward/acc", "accuracy"), ("response/length_mean", "response tokens"))


def demo_config(algo: str, overrides: list[str]):
    """The demo's RunConfig: SETTINGS, then ALGOS[algo], then the user's ``key=value`` overrides."""
    from megarl.config import load_config

    if algo not in ALGOS:
        raise ValueError(f"--algo {algo!r} is unknown; choose one of {', '.join(ALGOS)}.")
    run_dir = f"runs/demo-{algo}"
    given = {o.split("=", 1)[0] for o in overrides}
    if "run.dir" in given:
        run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir="))
    # the held-out split that the run generates next to its training data
    base = [*SETTINGS, f"run.dir={run_dir}", f"data.val_files={run_dir}/data/test.parquet"]
    return load_config(None, [*base, *ALGOS[algo], *overrides])


def metrics_figure(rows: list[dict], title: str, evals: list[dict] = ()):
    """A matplotlib figure with one panel per PLOTTED metric against the RL step; the accuracy panel also shows
    the held-out avg@k of ``evals`` (eval.jsonl records, step 0 = before training) when there are any."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a training machine
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.2))
    for ax, (key, label) in zip(axes, PLOTTED):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker=".", label="training samples")
        ax.set_xlabel("RL step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    avg = [(e["step"], v) for e in evals for k, v in e.items() if "/avg@" in k]
    if avg:
        acc = axes[[k for k, _ in PLOTTED].index("reward/acc")]
        acc.plot(*zip(*avg), marker="s", label="held-out avg@k")
        acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_metrics(run: Path, out: Path, title: str) -> Path:
    """The run's metrics.jsonl (and eval.jsonl) as a PNG (metrics_figure)."""
    import matplotlib.pyplot as plt

    from megarl.metrics import read_metrics

    fig = metrics_figure(read_metrics(run / "metrics.jsonl"), title, read_metrics(run / "eval.jsonl"))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summary(rows: list[dict], window: int = 5) -> str:
    """Mean reward / accuracy / length over the first and last ``window`` steps."""
    first, last = rows[:window], rows[-window:]

    def mean(part, key):
        return sum(r[key] for r in part) / len(part)

    lines = [f"{'':<18}steps {first[0]['step']}-{first[-1]['step']}   steps {last[0]['step']}-{last[-1]['step']}"]
    for key, label in PLOTTED:
        lines.append(f"{label:<18}{mean(first, key):>9.3f}   {mean(last, key):>11.3f}")
    return "\n".join(lines)


def run_demo(algo: str = "grpo", overrides: list[str] = ()) -> int:
    import torch.distributed as dist

    from megarl.trainer import run_training

    cfg = demo_config(algo, list(overrides))
    run = Path(cfg.run.dir)
    t0 = time.perf_counter()
    print(f"demo: {algo} on generated arithmetic with SmolLM2-135M-Instruct, {cfg.train.steps} steps of "
          f"{cfg.train.prompts_per_step} prompts x {cfg.rollout.group_size} samples; run dir {run}", flush=True)
    run_training(cfg)
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    from megarl.metrics import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    png = plot_metrics(run, run / "demo.png",
                       f"megarl demo: {algo}, SmolLM2-135M-Instruct, arithmetic")
    print(f"\ndemo done in {time.perf_counter() - t0:.0f}s (this invocation)\n{summary(rows)}")
    for line in eval_lines(run):
        print(f"held-out eval      {line}")
    where = [("config", run / "config.yaml"), ("metrics", run / "metrics.jsonl"), ("plot", png),
             ("checkpoints", run / "checkpoints"), ("HF model", run / "hf"), ("data", run / "data")]
    print("\n".join(f"{name:<18}{path}" for name, path in where if path.exists()))
    print(f"\nagain from scratch: rm -rf {run} && megarl demo --algo {algo}")
    return 0


def eval_lines(run: Path) -> list[str]:
    """The run's evaluations (run.dir/eval.jsonl), one line each."""
    from megarl.metrics import read_metrics

    return [f"step {r.pop('step'):>3}: " + "  ".join(f"{k}={v:.3f}" for k, v in r.items())
            for r in read_metrics(run / "eval.jsonl")]
