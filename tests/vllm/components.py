"""The trainer's components built inside a vLLM worker process (one rank, TP = PP = 1), for the workers that
check a generator against the policy (worker_sync.py, worker_partial.py)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def built(model_dir: str, run_dir: str, data: str, *overrides: str):
    """``build(cfg)`` of a small run on ``data`` with vLLM rollouts; the generator is closed on the way out."""
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.config import load_config
    from megarl.distributed import distributed
    from megarl.trainer.build import build
    from megarl.trainer.state import prepare_run_dir

    cfg = load_config(None, [f"model.hf_dir={model_dir}", f"run.dir={run_dir}", f"data.train_files={data}",
                             "rollout.vllm_kv_cache_mb=64", "reward.num_workers=0", "data.max_prompt_tokens=400",
                             *overrides])
    with distributed(), model_parallel(ParallelDims(1, 1)) as layout:
        prepare_run_dir(cfg)
        c = build(cfg, layout)
        try:
            yield c
        finally:
            c.generator.close()
