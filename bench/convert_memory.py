"""Peak memory and time of HF <-> Megatron conversion of the bundled SmolLM2-135M-Instruct (CPU).

    .venv/bin/python bench/convert_memory.py            # writes bench/results/<device>/convert_smollm2.json

Each direction runs as a fresh `megarl convert` process; its peak RSS (own and writer children, from getrusage)
is compared with the size of the weights and with the RSS of a process that only imports megarl's backend.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "megarl.cli", *args], capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return r.stdout


def main() -> None:
    from megarl.convert.bundled import materialize_smollm2
    from megarl.convert.hf_io import HFReader

    hf = materialize_smollm2()
    weights = sum(t.numel() * t.element_size() for t in map(HFReader(hf).get, HFReader(hf).names()))
    baseline = subprocess.run([sys.executable, "-c",
                               "import resource, megarl.backends.megatron.convert, transformers;"
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                              capture_output=True, text=True, cwd=REPO).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for name, args in (("hf_to_mcore", ("hf-to-mcore", str(hf), f"{tmp}/mcore")),
                           ("mcore_to_hf", ("mcore-to-hf", f"{tmp}/mcore", f"{tmp}/hf"))):
            text = run("convert", *args)
            secs, rss = re.search(r"in ([\d.]+)s, peak RSS ([\d.]+) MiB", text).groups()
            out[name] = {"seconds": float(secs), "peak_rss_mib": float(rss)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    result = {"bench": "convert_memory", "model": "SmolLM2-135M-Instruct (fp32)", "commit": commit,
              "command": "python bench/convert_memory.py", "device": f"cpu {platform.machine()}",
              "weights_mib": round(weights / 2**20, 1), "import_only_rss_mib": float(baseline), **out}
    dest = REPO / "bench" / "results" / "cpu" / "convert_smollm2.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
