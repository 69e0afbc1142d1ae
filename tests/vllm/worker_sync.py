"""Runs in its own process: builds the trainer's components with rollout.backend=vllm, syncs, then changes the
policy's weights behind the engine's back (a missed sync) and reports whether the sync check catches it."""

from __future__ import annotations

import json
import sys

import torch


def main(model_dir: str, run_dir: str, data: str) -> None:
    from tests.vllm.components import built

    out = {}
    with built(model_dir, run_dir, data, "rollout.backend=vllm", "rollout.max_tokens=8") as c:
        out["first"] = c.generator.sync()
        with torch.no_grad():  # an update the engine never receives
            for p in c.policy.module.parameters():
                p.mul_(1.02)
        try:
            c.generator._probe_diff()
            out["missed_sync_error"] = None
        except RuntimeError as e:
            out["missed_sync_error"] = str(e)
        out["stale_before_bump"] = c.generator.stale
        c.policy.version += 1
        out["stale_after_bump"] = c.generator.stale
        out["second"] = c.generator.sync()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
