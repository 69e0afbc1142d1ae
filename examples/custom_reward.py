"""A reward of your own: any ``package.module:function`` with ``compute_score``'s signature, named by
``reward.custom_fn``. This one keeps the built-in rule reward of each row's data_source and adds a small bonus for
short answers; it also returns a TRPA preference level (optional: without one, levels come from ``acc`` and the
score's rank).

    .venv/bin/megarl train --config configs/tiny.yaml reward.custom_fn=examples.custom_reward:brevity_bonus

It runs in reward worker processes (``reward.num_workers``), so it must be importable there: run from the
repository root, or put its package on PYTHONPATH. A return value that is not a dict with a finite ``score`` (or a
finite number), an exception or a timeout counts as a failed answer in ``reward/errors``, never ends the run.
"""

from __future__ import annotations

from megarl.rewards import compute_score


def brevity_bonus(data_source, solution_str, ground_truth, extra_info=None, **options) -> dict:
    base = compute_score(data_source, solution_str, ground_truth, extra_info, **options)
    bonus = 0.1 if len(solution_str) < 200 else 0.0
    return {**base, "score": base["score"] + bonus}
