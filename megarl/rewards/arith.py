"""Arithmetic reward (the demo's task, megarl.data.arith_dataset): the last integer of the response against the
result. Unlike GSM8K's flexible extraction, punctuation around the number does not matter ("It is 7." scores).

    score = 1.0 if the last match of -?[0-9]+ equals the ground truth as an integer, else 0.0
    level = TRPA level (rewards/levels.py): 1 right, 2 wrong integer, 4 no integer at all
"""

from __future__ import annotations

import re

from megarl.rewards.levels import answer_level

_INT = re.compile(r"-?[0-9]+")


def arithmetic_score(solution_str: str, ground_truth: str) -> dict:
    found = _INT.findall(solution_str)
    pred = int(found[-1]) if found else None
    correct = pred is not None and pred == int(str(ground_truth).strip())
    return {"score": 1.0 if correct else 0.0, "acc": correct, "pred": pred,
            "level": answer_level(pred, correct, ground_truth)}
