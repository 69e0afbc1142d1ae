"""verl-layout parquet: one row per prompt.

    data_source   str                        selects the reward (megarl.rewards)
    prompt        [{"role", "content"}, ...] chat messages
    ability       str                        optional
    reward_model  {"style", "ground_truth"}  ground_truth: str, or a dict (Knights-and-Knaves)
    extra_info    {...}                      optional (index, split, generation_prefix, ...)

Files written by pandas (numpy arrays for lists, extra index columns) read the same. Malformed rows raise
``DataError`` naming the file, the row and the field; nothing is skipped silently.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any


class DataError(ValueError):
    pass


def _plain(x: Any) -> Any:
    """numpy arrays / scalars (pandas-written files) -> Python lists / values."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def validate_row(row: dict, where: str) -> dict:
    """The row with plain Python values; raises DataError naming ``where`` and the field."""
    src = row.get("data_source")
    if not isinstance(src, str) or not src:
        raise DataError(f"{where}: field 'data_source' is missing or not a string (got {src!r}).")
    prompt = _plain(row.get("prompt"))
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: field 'prompt' must be a non-empty list of chat messages (got {type(prompt).__name__}).")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field 'prompt[{i}]' must be {{'role': str, 'content': str}} (got {m!r:.80}).")
    rm = row.get("reward_model")
    if not isinstance(rm, dict) or rm.get("ground_truth") is None:
        raise DataError(f"{where}: field 'reward_model.ground_truth' is missing.")
    gt = rm["ground_truth"]
    if "kk" in src and not (isinstance(gt, dict) and isinstance(gt.get("solution_text_format"), str)):
        raise DataError(f"{where}: field 'reward_model.ground_truth.solution_text_format' is missing "
                        f"(Knights-and-Knaves rows carry the solution text).")
    if "kk" not in src and (not isinstance(gt, (str, int)) or isinstance(gt, bool)):
        from megarl.rewards import reward_name

        try:
            reward_name(src)
        except ValueError:  # a source only a custom reward knows: its ground truth is its own business
            pass
        else:  # the built-in rewards compare answers as text: 7.0 would never equal "7"
            raise DataError(f"{where}: field 'reward_model.ground_truth' is {type(gt).__name__} {gt!r:.40}; the "
                            f"'{src}' reward compares answers as text: write it as a string (e.g. '7').")
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise DataError(f"{where}: field 'extra_info' must be a dict (got {type(extra).__name__}).")
    return {"data_source": src, "prompt": prompt, "ability": row.get("ability"),
            "reward_model": {"style": rm.get("style"), "ground_truth": gt}, "extra_info": extra}


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a verl-layout parquet file, validated."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    table = pq.read_table(path)
    missing = [c for c in ("data_source", "prompt", "reward_model") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} missing; verl layout needs data_source, prompt, reward_model "
                        f"(found {table.column_names}).")
    return [validate_row(r, f"{path} row {i}") for i, r in enumerate(table.to_pylist())]


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Write rows atomically (temporary file, then rename). Knights-and-Knaves ground truths stay dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    checked = [validate_row(r, f"row {i} to write") for i, r in enumerate(rows)]
    for r in checked:  # pyarrow needs one type per column: keep extra_info values JSON-plain
        r["extra_info"] = json.loads(json.dumps(r["extra_info"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(checked), tmp)
    os.replace(tmp, path)


def describe(path: str | Path, sample_rows: int = 2) -> str:
    """What ``megarl data inspect`` prints: schema, rows per data_source, sample rows."""
    import pyarrow.parquet as pq

    rows = read_rows(path)
    schema = pq.read_schema(path)
    counts = collections.Counter(r["data_source"] for r in rows)
    out = [f"{path}: {len(rows)} rows", "schema:"] + [f"  {f.name}: {f.type}" for f in schema]
    out.append("rows per data_source:")
    out += [f"  {src}: {n}" for src, n in counts.most_common()]
    for i, r in enumerate(rows[:sample_rows]):
        out.append(f"row {i}:")
        for m in r["prompt"]:
            text = m["content"].replace("\n", " ")
            out.append(f"  [{m['role']}] {text[:300]}{'...' if len(text) > 300 else ''}")
        out.append(f"  ground_truth: {str(r['reward_model']['ground_truth'])[:200]}")
    return "\n".join(out)
