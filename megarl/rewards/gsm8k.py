"""GSM8K answer reward (A*-PO's verl fork, verl/utils/reward_score/gsm8k.py at the A*-PO commit).

strict   the FIRST ``#### <number>`` in the response (regex ``#### (-?[0-9.,]+)``), commas and '$' removed. A*-PO's
         verl takes the first match; current verl takes the last: a response that repeats "#### n" with different
         numbers can score differently there.
flexible the LAST number anywhere in the response (skipping '' and '.'), commas removed
The extracted string must equal the ground truth with its thousands commas removed ("1,234" -> "1234", what verl's
GSM8K preprocessing does to the dataset's answers): score 1.0 (``correct_score``), else 0.0 (``format_score``).
Every result carries its TRPA preference level (rewards/levels.py). A*-PO trains with strict and estimated V*
with flexible (docs/algorithms.md).
"""

from __future__ import annotations

import re

from megarl.rewards.levels import answer_level

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")


def extract_gsm8k(text: str, method: str = "strict") -> str | None:
    if method == "strict":
        m = _STRICT.search(text)
        return m.group(1).replace(",", "").replace("$", "") if m else None
    if method == "flexible":
        for cand in reversed(_NUMBER.findall(text)):
            if cand not in ("", "."):
                return cand.replace(",", "")
        return None
    raise ValueError(f"gsm8k extraction method '{method}' is unknown; use 'strict' or 'flexible'.")


def gsm8k_score(solution_str: str, ground_truth: str, method: str = "strict", format_score: float = 0.0,
                correct_score: float = 1.0) -> dict:
    pred = extract_gsm8k(solution_str, method)
    correct = pred is not None and pred == str(ground_truth).replace(",", "")
    return {"score": correct_score if correct else format_score, "acc": correct, "pred": pred,
            "level": answer_level(pred, correct, ground_truth)}
