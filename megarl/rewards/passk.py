"""avg@k and pass@k of evaluation samples, per data_source.

    avg@k  = mean over prompts of (correct samples / k)
    pass@k = mean over prompts of 1 - C(n - c, k) / C(n, k)      (unbiased estimator, Chen et al. 2021, for
                                                                   n samples with c correct; n = k gives
                                                                   "any sample correct")
"""

from __future__ import annotations

import math
from collections import defaultdict


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_metrics(sources: list[str], correct: list[list[bool]], k: int) -> dict[str, float]:
    """``{"eval/<source>/avg@k": .., "eval/<source>/pass@k": ..}`` from each prompt's per-sample correctness."""
    by_source: dict[str, list[list[bool]]] = defaultdict(list)
    for src, c in zip(sources, correct):
        by_source[src].append(c)
    out = {}
    for src, rows in sorted(by_source.items()):
        out[f"eval/{src}/avg@{k}"] = sum(sum(r) / len(r) for r in rows) / len(rows)
        out[f"eval/{src}/pass@{k}"] = sum(pass_at_k(len(r), sum(r), k) for r in rows) / len(rows)
        out[f"eval/{src}/prompts"] = float(len(rows))
    return out
