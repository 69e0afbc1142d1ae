"""TRPA preference levels (1 = best) for every rule reward; see docs/algorithms.md, "TRPA preference levels".

TRPA pairs responses of one prompt by level, so every reward must say which answers are better than which.

Knights-and-Knaves (rewards/kk.py) keeps the Logic-RL / TRPA levels of its own reward. The answer-extraction
rewards (GSM8K, MATH, DAPO-Math, arithmetic) follow TRPA's math reward (its DeepScaleR variant):

    level 1   the extracted answer is right
    level 2   an answer was extracted and it is wrong
    level 3   the extracted answer is empty, or the row has no ground truth to compare with
    level 4   no answer could be extracted at all (no ``#### n``, no ``\\boxed{}``, no ``Answer:`` line, no integer)

Departure: TRPA's math reward also puts a response without ``</think>`` at level 4. Our math prompts do not ask
for think tags (A*-PO's and verl's prompts), so that check is not made; a task whose prompt asks for them can
return its own ``level`` from a custom reward.

A response cut off by ``rollout.max_tokens`` (finish reason "length") has given no final answer: its level is at
least 4, below every finished answer (``truncated_last``). TRPA's own rewards rank such a response there too (no
``</answer>`` or no ``</think>``), but the last integer of a cut-off ramble can still match the arithmetic answer.
Measured on the demo without this rule: TRPA's responses grew to the full 24 tokens by step 3 and stayed there
while its accuracy rose; the overlong penalty that teaches the other families brevity is not seen by a loss that
reads levels only.

Custom rewards (``reward.custom_fn``) may return ``level`` themselves. When any result of a step lacks one, the
levels of the whole step come from ``levels_from_scores``: level 1 for answers marked ``acc``, the other answers
ranked by their score, best first, from level 2 (equal scores share a level). A reward with only two values
(right/wrong) thus gives levels 1 and 2, and a graded one keeps its ordering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def answer_level(pred: Any, correct: bool, ground_truth: Any) -> int:
    """The TRPA level of an answer-extraction reward (module docstring). ``pred`` None = nothing extracted."""
    if pred is None:
        return 4
    if not str(pred).strip() or ground_truth is None or not str(ground_truth).strip():
        return 3
    return 1 if correct else 2


def levels_from_scores(scores: Sequence[float], acc: Sequence[bool]) -> list[int]:
    """Levels of one step's results that carry no level of their own: 1 if ``acc``, else 2 + the dense rank of
    the score among the distinct scores of the non-``acc`` results, highest first. A non-finite score ranks last."""
    rest = sorted({float(s) for s, a in zip(scores, acc) if not a and math.isfinite(s)}, reverse=True)
    rank = {s: i for i, s in enumerate(rest)}
    return [1 if a else 2 + rank.get(float(s), len(rest)) for s, a in zip(scores, acc)]


def truncated_last(levels: Sequence[int], finish_reasons: Sequence[str]) -> list[int]:
    """Levels with every response that hit the length limit moved to level 4 or below (module docstring)."""
    return [max(lv, 4) if why == "length" else lv for lv, why in zip(levels, finish_reasons)]
