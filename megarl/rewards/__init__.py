"""Rule-based rewards, dispatched by ``data_source`` as verl does. Each is a pure function text -> score dict.

    compute_score(data_source, solution_str, ground_truth, extra_info=None) -> {"score", "acc", ...}

kk_logic (and any source containing "kk")           Knights-and-Knaves, with "level" (1 best)   rewards/kk.py
openai/gsm8k                                        strict "#### n" (flexible on request)        rewards/gsm8k.py
arithmetic                                          the last integer                             rewards/arith.py
DigitalLearningGmbH/MATH-lighteval, lighteval/MATH,
HuggingFaceH4/MATH-500                              last \\boxed{}, Hendrycks + math-verify       rewards/math_boxed.py
math_dapo, aime*, amc*                              last "Answer:" line, Minerva, +1/-1          rewards/math_dapo.py
"""

from __future__ import annotations

from typing import Any

from megarl.rewards.arith import arithmetic_score
from megarl.rewards.gsm8k import gsm8k_score
from megarl.rewards.kk import kk_score
from megarl.rewards.math_boxed import math_boxed_score
from megarl.rewards.math_dapo import math_dapo_score

MATH_SOURCES = ("DigitalLearningGmbH/MATH-lighteval", "lighteval/MATH", "HuggingFaceH4/MATH-500")
KNOWN_SOURCES = ("kk_logic", "openai/gsm8k", "arithmetic", *MATH_SOURCES, "math_dapo", "aime*", "amc*")


def reward_name(data_source: str) -> str:
    """Which reward a data_source gets; raises naming the known sources."""
    if data_source == "kk_logic" or "kk" in data_source:
        return "kk"
    if data_source == "openai/gsm8k":
        return "gsm8k"
    if data_source == "arithmetic":
        return "arithmetic"
    if data_source in MATH_SOURCES:
        return "math"
    if data_source == "math_dapo" or data_source.startswith(("aime", "amc")):
        return "math_dapo"
    raise ValueError(f"no reward for data_source '{data_source}'; known: {', '.join(KNOWN_SOURCES)}.")


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  **options: Any) -> dict:
    """Score one response. ``options``: gsm8k_method ('strict'|'flexible'), use_math_verify (bool)."""
    name = reward_name(data_source)
    if name == "kk":
        return kk_score(solution_str, ground_truth)
    if name == "gsm8k":
        return gsm8k_score(solution_str, ground_truth, method=options.get("gsm8k_method", "strict"))
    if name == "arithmetic":
        return arithmetic_score(solution_str, ground_truth)
    if name == "math":
        return math_boxed_score(solution_str, ground_truth, use_math_verify=options.get("use_math_verify", True))
    return math_dapo_score(solution_str, ground_truth)
