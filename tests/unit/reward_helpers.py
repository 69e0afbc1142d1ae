"""Scoring functions that misbehave, importable by the executor's spawned workers."""

import signal
import time

from megarl.rewards import compute_score


def sleepy_or_real(data_source, solution_str, ground_truth, extra_info=None, **options):
    """Python-level hang for 'sleep' responses (the per-call alarm interrupts it); the real reward otherwise."""
    if solution_str == "sleep":
        time.sleep(60)
    if solution_str == "raise":
        raise RuntimeError("boom")
    return compute_score(data_source, solution_str, ground_truth, extra_info, **options)


def deaf_hang(data_source, solution_str, ground_truth, extra_info=None, **options):
    """A hang that ignores SIGALRM, like C code that never checks for signals: only the batch deadline stops it."""
    if solution_str == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    return compute_score(data_source, solution_str, ground_truth, extra_info, **options)


def bad_returns(data_source, solution_str, ground_truth, extra_info=None, **options):
    """A custom reward that returns what is not a score for some responses (issue 21)."""
    return {"nan": {"score": float("nan")}, "inf": float("inf"), "str": "1.0", "none": None, "num": 0.5,
            "nodict": {"acc": True}}.get(solution_str, {"score": 1.0, "acc": True})
