"""MATH reward: the last ``\\boxed{}`` of the response against the ground truth (A*-PO / verl math.py, r in {0, 1}).

Equivalence is decided in two steps:
1. Hendrycks et al.'s MATH normalisation (``strip_string``: drop \\left/\\right, units, degrees, dollars, spaces;
   canonical \\frac and \\sqrt; 0.5 -> \\frac{1}{2}; a/b -> \\frac{a}{b}) and string equality -- the upstream rule.
2. Only when the strings differ: math-verify (parse both into sympy, compare symbolically/numerically). It is the
   better judge for equivalent forms the string rule misses (``\\sqrt{8}`` vs ``2\\sqrt{2}``, ``0.25`` vs
   ``\\frac14``, reordered tuples); it can only turn a 0 into a 1, never the reverse.
Every result carries its TRPA preference level (rewards/levels.py).
"""

from __future__ import annotations

from megarl.rewards.levels import answer_level


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces) or ``\\boxed x``; None if absent."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    if rest.startswith("\\boxed ") and "{" not in rest.split(" ", 1)[0]:
        return rest[len("\\boxed "):].split("$")[0].strip()
    start = rest.find("{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[start + 1:i]
    return None


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub.startswith("{") or len(sub) < 2:
            if len(sub) < 2 and not sub.startswith("{"):
                return s
            out += sub
            continue
        a, b, tail = sub[0], sub[1], sub[2:]
        out += "{" + a + "}" + ("{" + b + "}" + tail if b != "{" else b + tail)
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    parts = s.split("\\sqrt")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\sqrt" + (sub if sub.startswith("{") or not sub else "{" + sub[0] + "}" + sub[1:])
    return out


def _remove_right_units(s: str) -> str:
    """"5 \\text{ cm}" -> "5 ": a single ``\\text{ `` starts the unit (Hendrycks, who asserts there is exactly
    one). With more (``6 \\text{ cm} \\text{ and } 8``) the text is part of the answer, so nothing is cut:
    cutting at the first would score that answer as "6"."""
    return s.split("\\text{ ")[0] if s.count("\\text{ ") == 1 else s


def strip_string(s: str) -> str:
    """Hendrycks MATH answer normalisation."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")  # Hendrycks and verl strip the escaped percent only: "50%" is not "50"
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 3" -> "3"
        s = sides[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def math_verify_equal(gold: str, pred: str) -> bool:
    """math-verify's symbolic/numeric equivalence; False when it cannot parse either side."""
    from math_verify import parse, verify

    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))
    except Exception:  # math-verify raises on malformed LaTeX: treat as not equivalent
        return False


def math_boxed_score(solution_str: str, ground_truth: str, use_math_verify: bool = True) -> dict:
    """Score the last boxed answer. A ground truth that is itself a solution with ``\\boxed{}`` (the MATH dataset's
    ``solution`` column) is reduced to its last boxed content first, what verl's data preprocessing does."""
    gold = last_boxed(ground_truth) if "\\boxed" in ground_truth else ground_truth
    pred = last_boxed(solution_str)
    judge = None
    if pred is not None and strip_string(pred) == strip_string(gold):
        judge = "string"
    elif pred is not None and use_math_verify and math_verify_equal(gold, pred):
        judge = "math_verify"
    correct = judge is not None
    return {"score": 1.0 if correct else 0.0, "acc": correct, "pred": pred, "judge": judge,
            "level": answer_level(pred, correct, gold)}
