"""Prompts for training and evaluation: verl-layout parquet rows rendered and tokenized, in a seeded order.

The order is a function of (seed, epoch) only, and a position counts prompts consumed since the start of the run,
so resuming at a recorded position continues with exactly the prompts an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from megarl.data.parquet import DataError, read_rows
from megarl.data.prompts import render_prompt


@dataclasses.dataclass(frozen=True)
class Prompt:
    uid: int  # position in the run's prompt stream (unique per step and data-parallel rank)
    ids: list[int]
    data_source: str
    ground_truth: Any
    extra_info: dict
    v_star: float | None = None  # A*-PO: extra_info["v_star"], written by `megarl vstar`


class PromptSource:
    """All rows of ``files`` (concatenated); ``take(position, n)`` -> the next n prompts of the seeded order."""

    def __init__(self, files: list[str | Path], tokenizer, *, max_prompt_tokens: int, seed: int = 0,
                 shuffle: bool = True):
        if not files:
            raise ValueError("no data files: set data.train_files (or data.val_files for evaluation).")
        self.rows: list[tuple[str, int, dict]] = []
        for f in files:
            self.rows += [(str(f), i, r) for i, r in enumerate(read_rows(f))]
        if not self.rows:
            raise DataError(f"{', '.join(map(str, files))}: no rows.")
        self.tokenizer, self.max_prompt_tokens = tokenizer, max_prompt_tokens
        self.seed, self.shuffle = seed, shuffle
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch cached at a time
        return self._orders[epoch]

    def prompt(self, row_index: int, uid: int) -> Prompt:
        path, i, row = self.rows[row_index]
        extra = dict(row["extra_info"])
        text = render_prompt(row["prompt"], self.tokenizer, raw_template=extra.get("raw_template"),
                             generation_prefix=extra.get("generation_prefix", ""))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise DataError(f"{path} row {i}: the prompt has {len(ids)} tokens, more than data.max_prompt_tokens="
                            f"{self.max_prompt_tokens}; raise data.max_prompt_tokens or drop the row.")
        v_star = extra.get("v_star")
        return Prompt(uid, ids, row["data_source"], row["reward_model"]["ground_truth"], extra,
                      None if v_star is None else float(v_star))

    def take(self, position: int, n: int) -> list[Prompt]:
        """Prompts ``position .. position+n-1`` of the stream (epochs follow each other)."""
        out = []
        for pos in range(position, position + n):
            epoch, offset = divmod(pos, len(self.rows))
            out.append(self.prompt(self._order(epoch)[offset], pos))
        return out
