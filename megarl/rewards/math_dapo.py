"""DAPO-Math / AIME / AMC reward: the last ``Answer: ...`` line, Minerva-normalised, exact match, +1 / -1
(verl math_dapo.py, whose normalisation comes from Minerva via lm-evaluation-harness).

Every result carries its TRPA preference level (rewards/levels.py). Only the last 300 characters of the response are read. The DAPO overlong penalty is a separate shaping step:
``megarl.rollout.shaping.overlong_penalty``.
"""

from __future__ import annotations

import re

from megarl.rewards.levels import answer_level

_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
# Minerva's answer normalisation tables (Lewkowycz et al. 2022, appendix), as used by verl.
SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
REMOVED_EXPRESSIONS = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
                       "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
                       "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
                       "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
                       r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots")


def normalize_final_answer(answer: str) -> str:
    """Minerva normalisation: the part after the last '=', units and TeX wrappers removed, shorthand expanded."""
    answer = answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    for wrapper in ("text", "textbf", "overline"):
        answer = re.sub(rf"(\\{wrapper}\{{)(.*?)(\}})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)  # \fracab -> \frac{a}{b}
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)  # \sqrta -> \sqrt{a}
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def math_dapo_score(solution_str: str, ground_truth: str) -> dict:
    matches = _ANSWER_LINE.findall(solution_str[-300:])
    pred = normalize_final_answer(matches[-1] if matches else "[INVALID]")
    gold = normalize_final_answer(str(ground_truth))
    correct = pred == gold
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred,
            "level": answer_level(pred if matches else None, correct, gold)}
