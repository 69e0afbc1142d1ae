"""Procedural Knights-and-Knaves puzzles with a unique solution (the TRPA / Logic-RL task; Xie et al. 2024,
"On Memorization of Large Language Models in Logical Reasoning", K-and-K/knights-and-knaves).

Every inhabitant makes one statement about the inhabitants (possibly themself). Knights' statements are true,
knaves' false, so a role assignment is consistent iff knight(p) == truth(statement_p) for every p. A puzzle is
kept only if exactly one of the 2^n assignments is consistent (checked by enumeration).

Statement kinds, as in the original set: telling-truth ("X is a knight"), lying ("X is a knave"), not, and, or,
if-then, if-and-only-if. Compound statements combine two atoms.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

NAMES = ("Zoey", "Oliver", "Ethan", "Mia", "Liam", "Ava", "Noah", "Emma", "Lucas", "Sophia", "Mason", "Isabella",
         "Logan", "Harper", "Elijah", "Amelia", "James", "Evelyn", "Aiden", "Abigail", "Jacob", "Emily", "Jackson",
         "Ella", "Samuel", "Aria", "David", "Scarlett", "Joseph", "Grace", "Owen", "Chloe", "Henry", "Victoria",
         "Sebastian", "Riley", "Jack", "Lily", "Luke", "Aubrey", "Gabriel", "Hannah", "Daniel", "Layla", "Matthew",
         "Zoe", "Wyatt", "Nora", "Caleb", "Stella", "Leo", "Penelope", "Isaac", "Lucy", "Dylan", "Violet")
KINDS = ("telling-truth", "lying", "not", "and", "or", "if-then", "iff")
VERBS = ("said that", "told you that", "claimed that", "stated that", "remarked that", "mentioned that")

# A statement is a nested tuple: ("is", person, knight: bool) | ("not", s) | (op, s1, s2), op in and/or/imp/iff.
Statement = tuple


def evaluate(stmt: Statement, knights: tuple[bool, ...]) -> bool:
    op = stmt[0]
    if op == "is":
        return knights[stmt[1]] == stmt[2]
    if op == "not":
        return not evaluate(stmt[1], knights)
    a, b = evaluate(stmt[1], knights), evaluate(stmt[2], knights)
    return {"and": a and b, "or": a or b, "imp": (not a) or b, "iff": a == b}[op]


def render(stmt: Statement, names: list[str]) -> str:
    op = stmt[0]
    if op == "is":
        return f"{names[stmt[1]]} is a {'knight' if stmt[2] else 'knave'}"
    if op == "not":
        inner = stmt[1]
        return f"{names[inner[1]]} is not a {'knight' if inner[2] else 'knave'}"
    a, b = render(stmt[1], names), render(stmt[2], names)
    return {"and": f"{a} and {b}", "or": f"{a} or {b}", "imp": f"if {a} then {b}",
            "iff": f"{a} if and only if {b}"}[op]


def consistent_assignments(statements: list[Statement]) -> list[tuple[bool, ...]]:
    n = len(statements)
    return [k for k in itertools.product((True, False), repeat=n)
            if all(k[p] == evaluate(statements[p], k) for p in range(n))]


@dataclasses.dataclass(frozen=True)
class Puzzle:
    names: list[str]
    statements: list[Statement]
    knights: tuple[bool, ...]

    @property
    def quiz(self) -> str:
        n = len(self.names)
        who = ", ".join(self.names[:-1]) + f", and {self.names[-1]}" if n > 2 else " and ".join(self.names)
        lines = [f"A very special island is inhabited only by knights and knaves. Knights always tell the truth, "
                 f"and knaves always lie. You meet {n} inhabitants: {who}."]
        for p, s in enumerate(self.statements):
            verb = VERBS[(p + len(self.names[p])) % len(VERBS)]
            lines.append(f"{self.names[p]} {verb} {render(s, self.names)}.")
        lines.append("So who is a knight and who is a knave?")
        return " ".join(lines)

    @property
    def worked_solution(self) -> str:
        """A response in the K&K answer format, for a supervised warm-up (``megarl sft``): the solution, every
        statement checked against it, then the answer lines. It teaches the format and how to check an assignment,
        not how to find one (the prompt ends with ``<think>``, so the text starts inside the thinking)."""
        role = ["a knight" if k else "a knave" for k in self.knights]
        guess = ", ".join(f"{n} is {r}" for n, r in zip(self.names, role))
        checks = [f"{n} is {r}, so the claim \"{render(s, self.names)}\" must be {'true' if k else 'false'}, "
                  f"and it is {'true' if evaluate(s, self.knights) else 'false'}."
                  for n, r, s, k in zip(self.names, role, self.statements, self.knights)]
        return (f" Suppose {guess}. " + " ".join(checks) + " Every statement fits these roles.\n</think>\n"
                f"<answer> {self.solution_text_format} </answer>")

    @property
    def solution_text_format(self) -> str:
        return "\n".join(f"({i + 1}) {name} is a {'knight' if k else 'knave'}"
                         for i, (name, k) in enumerate(zip(self.names, self.knights)))


def _random_atom(rng: random.Random, n: int) -> Statement:
    return ("is", rng.randrange(n), rng.random() < 0.5)


def random_statement(rng: random.Random, n: int, speaker: int) -> Statement:
    kind = rng.choice(KINDS)
    if kind == "telling-truth":
        return ("is", rng.choice([p for p in range(n) if p != speaker] or [speaker]), True)
    if kind == "lying":
        return ("is", rng.choice([p for p in range(n) if p != speaker] or [speaker]), False)
    if kind == "not":
        return ("not", _random_atom(rng, n))
    a, b = _random_atom(rng, n), _random_atom(rng, n)
    while b[1] == a[1]:
        b = _random_atom(rng, n)
    return ({"and": "and", "or": "or", "if-then": "imp", "iff": "iff"}[kind], a, b)


def generate_puzzle(rng: random.Random, n_people: int, max_tries: int = 10_000) -> Puzzle:
    """A random puzzle over ``n_people`` (2..8) with exactly one consistent assignment."""
    if not 2 <= n_people <= 8:
        raise ValueError(f"people={n_people}: Knights-and-Knaves puzzles here have 2 to 8 people.")
    for _ in range(max_tries):
        names = rng.sample(NAMES, n_people)
        statements = [random_statement(rng, n_people, p) for p in range(n_people)]
        sols = consistent_assignments(statements)
        if len(sols) == 1:
            return Puzzle(names, statements, sols[0])
    raise RuntimeError(f"no uniquely solvable {n_people}-person puzzle in {max_tries} tries")
