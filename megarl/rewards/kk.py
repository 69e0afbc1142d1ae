"""Knights-and-Knaves rule reward with TRPA preference levels (docs/algorithms.md, "TRPA preference levels";
Logic-RL's reward as ported by TRPA, XueruiSu/Trust-Region-Preference-Approximation verl/utils/reward_score/kk.py).

    format   +1 if <think>, </think>, <answer>, </answer> each appear exactly once, in that order; else -1
    answer   +2 all roles right (level 1) | -1.5 parsed but wrong (level 2) | -2 answer present but unparseable
             (level 3) | -2 format bad, or answer missing/empty (level 4)
    score    format + answer: 3, -0.5, -1, -3 (bad format) or -1 (good format, empty answer)

Departure (DERIVED): upstream checks the text after the assistant header, which includes the ``<think>`` that the
TRPA prompt ends with. We score the response alone and treat it as opened by the prompt's ``<think>`` when it
contains no ``<think>`` of its own, so a response scores the same whether or not its prompt ended with ``<think>``.
"""

from __future__ import annotations

import re

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GT_LINE = re.compile(r"\b([A-Za-z]+)\b.*?\b(knight|knave)\b", re.IGNORECASE)


def response_text(solution_str: str) -> str:
    """The model's own text. megarl passes the response alone (as verl's reward managers do); a caller that passes
    prompt + response in the chat template is cut after its ``<|im_start|>assistant`` header, a special token the
    model's decoded text does not contain. The base template's plain ``Assistant:`` is never a cut: a response may
    write it itself (``...</answer>\nAssistant: done`` would otherwise lose its answer and score -3)."""
    header = "<|im_start|>assistant"
    if header in solution_str:
        solution_str = solution_str.split(header, 1)[1]
    return solution_str if "<think>" in solution_str else "<think>" + solution_str


def format_ok(text: str) -> bool:
    if any(text.count(t) != 1 for t in TAGS):
        return False
    pos = [text.find(t) for t in TAGS]
    return pos == sorted(pos)


def parse_ground_truth(solution_text_format: str) -> dict[str, str]:
    """'(1) Zoey is a knight\\n(2) Oliver is a knave' -> {'Zoey': 'knight', 'Oliver': 'knave'}."""
    roles = {}
    for line in solution_text_format.splitlines():
        m = _GT_LINE.search(line.strip())
        if m:
            roles[m.group(1)] = m.group(2).lower()
    return roles


def parse_answer(answer: str, names: list[str]) -> dict[str, str] | None:
    """Roles claimed in the answer, or None when the answer does not name every person exactly once."""
    low = answer.lower()
    if low.count("knight") + low.count("knave") != len(names):
        return None
    roles = {}
    for name in names:
        m = re.search(rf"\b{re.escape(name)}\b\s+is\s+a\s+\b(knight|knave)\b", answer, re.IGNORECASE)
        if not m:
            return None
        roles[name] = m.group(1).lower()
    return roles


def kk_score(solution_str: str, ground_truth: dict) -> dict:
    """The K&K reward of one response. ``ground_truth`` holds ``solution_text_format``."""
    truth = parse_ground_truth(ground_truth["solution_text_format"])
    text = response_text(solution_str)
    fmt = format_ok(text)
    matches = list(_ANSWER.finditer(text))
    answer = matches[-1].group(1).strip() if matches else ""
    if not fmt or not answer:
        answer_score, level = -2.0, 4
    else:
        pred = parse_answer(answer, list(truth))
        if pred is None:
            answer_score, level = -2.0, 3
        elif pred == truth:
            answer_score, level = 2.0, 1
        else:
            answer_score, level = -1.5, 2
    return {"score": (1.0 if fmt else -1.0) + answer_score, "acc": level == 1, "level": level,
            "format_ok": fmt}
