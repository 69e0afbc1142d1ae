"""RPG's variants against REINFORCE++ on the CPU demo, in one run (issue 19; the RPG paper's own comparison).

    .venv/bin/python bench/rpg_variants.py                 # every variant, 15 steps each (about 40 minutes)
    .venv/bin/python bench/rpg_variants.py train.steps=30  # any config override, applied to every variant
    .venv/bin/python bench/rpg_variants.py --tag offpolicy train.minibatches_per_step=4 train.steps=10
                                                           # off-policy: 4 optimizer steps per RL step, so the
                                                           # ratio pi/pi_old departs from 1 and the clips act

Each variant is ``megarl demo --algo rpg algo.loss=<variant>`` (REINFORCE++ is ``--algo reinforce_pp``), all at
the RPG family's demo temperature (0.7) so that only the loss and its advantage differ; a finished variant is not
run again. Writes bench/results/<device>/rpg_variants[_<tag>].json (the same record per variant as
``megarl demo --algo all``: megarl/demo_compare.py) and rpg_variants.png beside it.
"""

from __future__ import annotations

import json
import sys

from results_io import REPO, write_result

# (label, demo family, overrides): RPG's differentiable losses with each divergence, its REINFORCE-style losses
# with the RPG-style clip, and REINFORCE++ with its baseline (the paper's comparison)
VARIANTS = [
    *[(f"rpg_{d}", "rpg", [f"algo.loss=rpg_{d}"]) for d in ("fkl", "rkl", "ufkl", "urkl")],
    *[(f"rpg_rf_{d}_clip", "rpg", [f"algo.loss=rpg_rf_{d}_clip"]) for d in ("fkl", "rkl")],
    ("reinforce_pp", "reinforce_pp", []),
]
COMMON = ["rollout.temperature=0.7", "train.steps=15"]


def main() -> None:
    sys.path.insert(0, str(REPO))
    import matplotlib.pyplot as plt

    from megarl.demo_compare import _run_family, family_record, figure, table

    args = sys.argv[1:]
    tag = ""
    if args[:1] == ["--tag"]:
        tag, args = f"_{args[1]}", args[2:]
    overrides = [*COMMON, *args]
    root = REPO / "runs" / f"rpg-variants{tag.replace('_', '-')}"
    records = []
    for label, family, extra in VARIANTS:
        run, rec_path = root / label, root / label / "compare_record.json"
        given = [*extra, *overrides]
        done = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
        if done.get("overrides_given") != given:
            print(f"\nrpg variants: {label}", flush=True)
            proc = _run_family(family, run, given)
            if proc["returncode"]:
                sys.exit(f"rpg variants: {label} failed (its output is above)")
            done = {**family_record(family, run, proc), "algo": label, "overrides_given": given}
            rec_path.write_text(json.dumps(done, indent=1))
        records.append(done)
    fig = figure(records)
    fig.suptitle("RPG variants against REINFORCE++: the CPU demo (SmolLM2-135M-Instruct, arithmetic), temperature 0.7"
                 + (f", {' '.join(args)}" if args else ""))
    dest = write_result("rpg_variants", records, sys.argv[1:], file=f"rpg_variants{tag}")
    fig.savefig(dest.with_suffix(".png"), dpi=100)
    plt.close(fig)
    print(f"\n{table(records)}\n\nwrote {dest} and {dest.with_suffix('.png')}")


if __name__ == "__main__":
    main()
