"""Knights-and-Knaves datasets in verl layout (``megarl data kk``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from megarl.data.kk_puzzles import generate_puzzle
from megarl.data.parquet import write_rows
from megarl.data.prompts import BASE_TEMPLATE, KK_SYSTEM, TEMPLATES


def kk_row(puzzle, index: int, split: str, template: str) -> dict:
    """One verl row. instruct: system + user messages, rendered with the chat template then ``<think>``;
    base: one user message, rendered with ``extra_info.raw_template``."""
    if template == "instruct":
        prompt = [{"role": "system", "content": KK_SYSTEM}, {"role": "user", "content": puzzle.quiz}]
        extra = {"generation_prefix": "<think>"}
    elif template == "base":
        prompt = [{"role": "user", "content": puzzle.quiz}]
        extra = {"raw_template": BASE_TEMPLATE, "generation_prefix": " <think>"}
    else:
        raise ValueError(f"data.template='{template}' is unknown; use one of {', '.join(TEMPLATES)}.")
    return {"data_source": "kk_logic", "prompt": prompt, "ability": "logic",
            "reward_model": {"style": "rule",
                             "ground_truth": {"solution_text_format": puzzle.solution_text_format,
                                              "statements": json.dumps(puzzle.statements)}},
            # extra_info.response: a worked solution, the target of a supervised warm-up (`megarl sft`)
            "extra_info": {"split": split, "index": index, "people": len(puzzle.names), **extra,
                           "response": puzzle.worked_solution}}


def write_kk_dataset(out_dir: str | Path, n_train: int, n_test: int, people: list[int], seed: int = 0,
                     template: str = "instruct") -> dict[str, int]:
    """``train.parquet`` and ``test.parquet`` with puzzles spread evenly over ``people``; the test split never
    repeats a train quiz."""
    rng = random.Random(seed)
    seen: set[str] = set()
    counts = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        while len(rows) < n:
            puzzle = generate_puzzle(rng, people[len(rows) % len(people)])
            if puzzle.quiz in seen:
                continue
            seen.add(puzzle.quiz)
            rows.append(kk_row(puzzle, len(rows), split, template))
        write_rows(Path(out_dir) / f"{split}.parquet", rows)
        counts[split] = len(rows)
    return counts
