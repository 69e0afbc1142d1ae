"""Runs in its own process: builds the trainer's components with rollout.backend=vllm, syncs, then changes the
policy's weights behind the engine's back (a missed sync) and reports whether the sync check catches it."""

from __future__ import annotations

import json
import sys

import torch


def main(model_dir: str, run_dir: str, data: str) -> None:
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.config import load_config
    from megarl.distributed import distributed
    from megarl.trainer.build import build
    from megarl.trainer.loop import prepare_run_dir

    cfg = load_config(None, [f"model.hf_dir={model_dir}", f"run.dir={run_dir}", f"data.train_files={data}",
                             "rollout.backend=vllm", "rollout.vllm_kv_cache_mb=64", "reward.num_workers=0",
                             "rollout.max_tokens=8", "data.max_prompt_tokens=400"])
    out = {}
    with distributed(), model_parallel(ParallelDims(1, 1)) as layout:
        prepare_run_dir(cfg)
        c = build(cfg, layout)
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
        c.generator.close()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
