"""A run's metrics.jsonl (one JSON object per RL step) as a plot of any keys against the step.

    .venv/bin/python examples/plot_metrics.py runs/demo-grpo reward/mean actor/entropy   # writes RUN/metrics.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from megarl.metrics import read_metrics


def plot(run_dir: str | Path, keys: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / "metrics.jsonl")  # a torn last line of a killed run is skipped
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl: no metrics yet")
    missing = [k for k in keys if not any(k in r for r in rows)]
    if missing:
        raise SystemExit(f"no such metric: {', '.join(missing)}; some there are: {', '.join(sorted(rows[-1])[:12])}")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".")
        ax.set_title(key)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    print(f"wrote {plot(sys.argv[1], sys.argv[2:])}")
