"""A reward for tests with a random-weight model: deterministic in the text, and varied enough that every group
has different rewards (a real rule reward gives a random model the same score on every sample)."""

from __future__ import annotations

import zlib


def text_hash_reward(data_source, solution_str, ground_truth, extra_info=None, **options) -> dict:
    h = zlib.crc32(solution_str.encode())
    level = 1 + h % 4  # TRPA preference level 1..4
    return {"score": float(h % 7) / 3.0 - 1.0, "acc": h % 3 == 0, "level": level}


def prompt_constant_reward(data_source, solution_str, ground_truth, extra_info=None, **options) -> dict:
    """The same score for every response of a prompt (a function of its ground truth): V* must equal it."""
    return {"score": prompt_constant(ground_truth), "acc": False}


def prompt_constant(ground_truth) -> float:
    return float(zlib.crc32(repr(ground_truth).encode()) % 5) / 4.0


def huge_reward(data_source, solution_str, ground_truth, extra_info=None, **options) -> dict:
    """Finite scores of +-1e300: r - mean overflows float32, so Dr. GRPO's advantages (no std) are inf (issue 21)."""
    return {"score": 1e300 if zlib.crc32(solution_str.encode()) % 2 else -1e300, "acc": False}
