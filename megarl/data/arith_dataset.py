"""Arithmetic datasets in verl layout (the CPU demo's task; ``megarl data arithmetic``).

Each row asks for ``a + b`` or ``a - b`` with operands in ``1..max_operand`` (differences kept >= 0) under a short
system prompt, so prompts stay ~25 tokens and answers a few tokens: a task a 135M model can be trained on in
minutes on a CPU. The reward (``data_source="arithmetic"``, megarl/rewards/arith.py) is the last integer of the
response against the result.
"""

from __future__ import annotations

import random
from pathlib import Path

from megarl.data.parquet import write_rows

ARITH_SYSTEM = "You are a calculator. Reply with the result only."
ARITH_SOURCE = "arithmetic"


def arith_row(a: int, op: str, b: int, index: int, split: str) -> dict:
    result = a + b if op == "+" else a - b
    return {"data_source": ARITH_SOURCE, "ability": "arithmetic",
            "prompt": [{"role": "system", "content": ARITH_SYSTEM}, {"role": "user", "content": f"{a} {op} {b}"}],
            "reward_model": {"style": "rule", "ground_truth": str(result)},
            "extra_info": {"split": split, "index": index}}


def write_arith_dataset(out_dir: str | Path, n_train: int, n_test: int, max_operand: int = 9,
                        seed: int = 0) -> dict[str, int]:
    """``train.parquet`` and ``test.parquet`` of distinct problems, the two splits disjoint (the test split takes
    at most a quarter of the problems); asking for more rows than there are problems is an error."""
    if max_operand < 1:
        raise ValueError(f"data.arith_max_operand={max_operand} must be >= 1.")
    space = [(a, op, b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1) for op in "+-"
             if op == "+" or a >= b]
    rng = random.Random(seed)
    rng.shuffle(space)
    counts = {}
    if n_train < 1 or n_test < 0:
        raise ValueError(f"arithmetic data: {n_train} training and {n_test} test rows; need >= 1 and >= 0.")
    k = max(1, min(n_test, len(space) // 4))  # space has >= 2 problems (1 + 1, 1 - 1)
    test, rest = space[:k], space[k:]
    for split, n, pool in (("test", n_test, test), ("train", n_train, rest)):
        if n > len(pool):  # repeating problems would silently shrink the data (and leak between splits)
            raise ValueError(f"arithmetic data: {n} {split} rows asked, but operands 1..{max_operand} give only "
                             f"{len(pool)} distinct {split} problems ({len(space)} in all; the test split takes at "
                             f"most a quarter). Raise the largest operand (--max-operand / data.arith_max_operand) "
                             f"or ask for fewer rows (--train, --test / data.generate_size).")
        rows = [arith_row(*pool[i], index=i, split=split) for i in range(n)]
        write_rows(Path(out_dir) / f"{split}.parquet", rows)
        counts[split] = len(rows)
    return counts
