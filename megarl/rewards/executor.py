"""Reward execution that cannot take a run down: a process pool, a per-call timeout, failures scored and counted.

Math verification can hang (sympy on adversarial LaTeX, catastrophic regex backtracking in C where no signal
gets through) or raise. Each call therefore runs in a worker process, under two limits:

- per call: a SIGALRM timer of ``timeout_s`` inside the worker interrupts Python-level hangs (sympy, parsing);
- per batch: calls not done by ``timeout_s * (ceil(n / workers) + 1)`` are abandoned (C-level hangs ignore
  signals) and the pool is replaced, which kills the stuck workers.

A call that raises, times out, or returns something that is not a score (not a dict with a finite ``score`` or a
finite number; NaN and inf included) gets the failed-answer score of its reward and is counted in the stats, so one
bad response costs one timeout, never the run. With ``num_workers=0`` the per-call alarm runs in the trainer's own
main thread (Python-level hangs only: a C-level hang there cannot be interrupted; use workers for untrusted code).

Why not concurrent.futures: a ProcessPoolExecutor cannot kill one hung worker, and a timed-out future keeps
its worker busy forever.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import signal
import time
from typing import Any

from megarl.rewards import compute_score, reward_name

# the score and TRPA level of an answer that could not be scored (a reward that raised or timed out)
FAILED_SCORE = {"kk": {"score": -3.0, "acc": False, "level": 4}, "gsm8k": {"score": 0.0, "acc": False, "level": 4},
                "math": {"score": 0.0, "acc": False, "level": 4},
                "math_dapo": {"score": -1.0, "acc": False, "level": 4},
                "arithmetic": {"score": 0.0, "acc": False, "level": 4}}


@dataclasses.dataclass(frozen=True)
class RewardRequest:
    data_source: str
    solution_str: str
    ground_truth: Any
    extra_info: dict | None = None


def _score(req: RewardRequest, options: dict, score_fn=compute_score) -> dict:
    return score_fn(req.data_source, req.solution_str, req.ground_truth, req.extra_info, **options)


class _CallTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise _CallTimeout()


def checked(out: Any) -> dict:
    """A reward's return value as a result dict, or a failure record: a finite number is ``{"score": x}``; a dict
    needs a finite numeric ``score``."""
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        out = {"score": float(out), "acc": False}
    if not isinstance(out, dict) or "score" not in out:
        return {"__failure__": "errors", "why": f"the reward returned {type(out).__name__} {str(out)[:60]!r}, not a "
                                                f"dict with 'score' or a number"}
    score = out["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return {"__failure__": "errors", "why": f"the reward's score is {score!r}, not a finite number"}
    return out


def _score_in_worker(req: RewardRequest, options: dict, timeout_s: float, score_fn) -> dict:
    """Score under a per-call alarm (a worker, or the main thread of the trainer); errors come back as data, not as
    pickled exceptions. The previous SIGALRM handler is restored."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return checked(_score(req, options, score_fn))
    except _CallTimeout:
        return {"__failure__": "timeouts", "why": f"timed out after {timeout_s}s"}
    except Exception as e:  # a bad response must not end the run
        return {"__failure__": "errors", "why": f"{type(e).__name__}: {e}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_score_fn(spec: str):
    """``"package.module:function"`` -> the function (reward.custom_fn); errors name the key and the fix."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"reward.custom_fn='{spec}' must be 'package.module:function'.")
    import os
    import sys

    if os.getcwd() not in sys.path:  # as `python -m` would: the console script's path holds only its own folder
        sys.path.append(os.getcwd())  # (spawned reward workers inherit sys.path)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.custom_fn='{spec}' cannot be loaded ({e}); the module must be importable "
                         f"(on PYTHONPATH) in the trainer and in reward workers.") from None
    if not callable(fn):
        raise ValueError(f"reward.custom_fn='{spec}' is not a function.")
    return fn


def failed(req: RewardRequest, why: str) -> dict:
    try:
        base = FAILED_SCORE[reward_name(req.data_source)]
    except ValueError:  # a source only a custom reward knows
        base = {"score": 0.0, "acc": False}
    return {**base, "error": why}


class RewardExecutor:
    """``score(requests) -> (results, stats)``; results in request order, stats = counts of errors/timeouts.

    ``num_workers=0`` scores in this process, with the per-call alarm when on the main thread: for debugging and
    tiny runs.
    ``score_fn`` (a module-level function with compute_score's signature) replaces the built-in rewards.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, options: dict | None = None,
                 score_fn=compute_score):
        if num_workers < 0 or timeout_s <= 0:
            raise ValueError(f"reward.num_workers ({num_workers}) must be >= 0 and reward.timeout_s ({timeout_s}) > 0.")
        self.num_workers, self.timeout_s, self.options = num_workers, timeout_s, dict(options or {})
        self.score_fn = score_fn
        self._pool = None

    def _pool_get(self):
        if self._pool is None:
            # spawn, not fork: the trainer process holds torch threads and process groups that must not be forked
            self._pool = mp.get_context("spawn").Pool(self.num_workers)
        return self._pool

    def score(self, requests: list[RewardRequest]) -> tuple[list[dict], dict[str, int]]:
        for r in requests if self.score_fn is compute_score else ():
            reward_name(r.data_source)  # unknown sources are a configuration error, not a failed answer
        stats = {"errors": 0, "timeouts": 0}
        if self.num_workers == 0:
            import threading

            main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
            results = []
            for r in requests:
                if main:
                    out = _score_in_worker(r, self.options, self.timeout_s, self.score_fn)
                else:
                    try:
                        out = checked(_score(r, self.options, self.score_fn))
                    except Exception as e:  # a bad response must not end the run
                        out = {"__failure__": "errors", "why": f"{type(e).__name__}: {e}"}
                if "__failure__" in out:
                    stats[out["__failure__"]] += 1
                    out = failed(r, out["why"])
                results.append(out)
            return results, stats
        pool = self._pool_get()
        pending = [pool.apply_async(_score_in_worker, (r, self.options, self.timeout_s, self.score_fn))
                   for r in requests]
        deadline = time.monotonic() + self.timeout_s * (math.ceil(len(requests) / self.num_workers) + 1)
        results, abandoned = [], False
        for req, job in zip(requests, pending):
            try:
                out = job.get(timeout=max(0.0, deadline - time.monotonic()))
            except mp.TimeoutError:
                out, abandoned = {"__failure__": "timeouts", "why": "no result within the batch deadline"}, True
            if "__failure__" in out:
                stats[out["__failure__"]] += 1
                out = failed(req, out["why"])
            results.append(out)
        if abandoned:  # kill the workers stuck in C-level hangs
            self.close()
        return results, stats

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
