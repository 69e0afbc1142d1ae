"""The RL trainer: ``run_training(cfg)`` = process groups -> ``build(cfg)`` -> ``train(components)``."""

from __future__ import annotations

from megarl.config import RunConfig


def run_training(cfg: RunConfig) -> dict[str, float]:
    """Train (or resume) the run of ``cfg`` on every rank of this launch; returns the last step's metrics."""
    import torch.distributed as dist

    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.distributed import distributed
    from megarl.trainer.build import build
    from megarl.trainer.loop import prepare_run_dir, train

    with distributed() as info:
        cfg.validate(info.world_size)
        with model_parallel(ParallelDims(cfg.parallel.tp, cfg.parallel.pp), seed=cfg.run.seed):
            prepare_run_dir(cfg)
            components = build(cfg)
            metrics = train(components)
            dist.barrier()
    return metrics
