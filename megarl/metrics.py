"""Metrics of a run: phase timers, and one logger that writes every step to JSONL (always), TensorBoard and wandb
(when enabled) and a console progress bar with ETA and the live reward.

``run.dir/metrics.jsonl`` holds one JSON object per line: ``{"step": int, "<name>": float, ...}``. Lines are
flushed and fsynced per step, and on resume the lines past the checkpoint being resumed are dropped
(``truncate_metrics``), so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path


class Timer:
    """``with timer("generation"): ...`` accumulates seconds per phase; ``metrics()`` -> {"time/<phase>": s}."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def read_metrics(path: str | Path) -> list[dict]:
    """Every complete line of a metrics.jsonl (a torn last line from a killed run is ignored)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def append_jsonl(path: str | Path, record: dict) -> None:
    """One JSON line, flushed to disk (a kill leaves at most a torn last line, which read_metrics ignores)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only the lines of steps <= last_step (resume after a stop or a kill), atomically."""
    p = Path(path)
    if not p.is_file():
        return
    kept = [r for r in read_metrics(p) if r.get("step", 0) <= last_step]
    tmp = p.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, p)


class MetricsLogger:
    """Writes metrics on the main rank; a no-op elsewhere. Close it (or use it as a context manager)."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = False, wandb: bool = False, wandb_project: str = "megarl",
                 config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._bar = self._tb = self._wandb = None
        if not enabled:
            return
        self._file = open(self.path, "a")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("metrics.tensorboard=true needs the tensorboard package: "
                                  "pip install tensorboard (or megarl[train]).") from e
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError as e:
                raise ImportError("metrics.wandb=true needs the wandb package: pip install wandb "
                                  "(or megarl[train]).") from e
            os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user asks for it
            self._wandb = wb.init(project=wandb_project, dir=str(run_dir), config=config or {},
                                  name=Path(run_dir).name, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float))}
        if bad:
            raise TypeError(f"metrics must be numbers; got {bad}")
        record = {"step": step, **{k: float(v) for k, v in sorted(metrics.items())}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for k, v in metrics.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        if self._bar is not None:
            shown = {label: f"{metrics[k]:.3g}" for label, k in (("reward", "reward/mean"), ("acc", "reward/acc"),
                                                                  ("loss", "loss/total")) if k in metrics}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)

    def write(self, text: str) -> None:
        """A message that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._bar = self._tb = self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
