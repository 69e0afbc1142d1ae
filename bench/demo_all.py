"""Every algorithm family of the CPU demo at the same budget: ``megarl demo --algo all``, recorded as a benchmark.

    .venv/bin/python bench/demo_all.py                        # run it (49 minutes on 2 cores with train.steps=15), then record
    .venv/bin/python bench/demo_all.py --from runs/demo-all   # record a finished `megarl demo --algo all`

Writes bench/results/<device>/demo_all.json (per family: held-out avg@4/pass@4 at every evaluation, training
reward, median seconds per step, peak RSS, samples generated; see megarl/demo_compare.py) and demo_all.png beside
it. With ``--from``, ``--commit`` names the commit the recorded run was made at (default: this checkout's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from results_io import REPO, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", help="a finished `megarl demo --algo all` run.dir to record")
    ap.add_argument("--commit", help="with --from: the commit that run was made at")
    ap.add_argument("overrides", nargs="*", help="config overrides for the run (key=value)")
    args = ap.parse_args()
    src = Path(args.src) if args.src else REPO / "runs" / "demo-all"
    if not args.src:
        cmd = [sys.executable, "-m", "megarl.cli", "demo", "--algo", "all", f"run.dir={src}", *args.overrides]
        if subprocess.run(cmd, cwd=REPO).returncode:
            sys.exit("megarl demo --algo all failed; its output is above")
    records = json.loads((src / "compare.json").read_text())
    extra = {"commit_of_run": args.commit} if args.commit else {}
    argv = [f"--from {args.src}"] if args.src else args.overrides
    dest = write_result("demo_all", records, argv, **extra)
    shutil.copyfile(src / "compare.png", dest.with_suffix(".png"))
    print(f"wrote {dest} and {dest.with_suffix('.png')}")


if __name__ == "__main__":
    main()
