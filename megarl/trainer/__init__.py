"""The RL trainer: ``run_training(cfg)`` = process groups -> ``build(cfg)`` -> ``train(components)``."""

from __future__ import annotations

from megarl.config import RunConfig


def run_training(cfg: RunConfig) -> dict[str, float]:
    """Train (or resume) the run of ``cfg`` on every rank of this launch; returns the last step's metrics."""
    import torch.distributed as dist

    from megarl.backends.megatron.parallel import model_parallel
    from megarl.distributed import distributed
    from megarl.trainer.build import build
    from megarl.trainer.loop import train
    from megarl.trainer.state import prepare_run_dir

    with distributed() as info:
        cfg.validate(info.world_size)
        with model_parallel(cfg.parallel.dims(), seed=cfg.run.seed) as layout:
            prepare_run_dir(cfg)
            components = build(cfg, layout)
            try:
                metrics = train(components)
            finally:  # an inference engine lets go of the process group before it is torn down
                components.generator.close()
            dist.barrier()
    return metrics


def run_sft(cfg: RunConfig) -> dict[str, float]:
    """Supervised fine-tuning (``megarl sft``, megarl/trainer/sft.py) on every rank of this launch."""
    from megarl.backends.megatron.parallel import model_parallel
    from megarl.distributed import distributed
    from megarl.trainer.sft import sft

    with distributed() as info:
        cfg.validate(info.world_size)
        with model_parallel(cfg.parallel.dims(), seed=cfg.run.seed) as layout:
            return sft(cfg, layout)


def run_vstar(cfg: RunConfig, out_dir: str | None = None, **options) -> list[str]:
    """A*-PO stage 1 alone (``megarl vstar``): V* of every prompt of data.train_files under model.hf_dir, written
    to ``out_dir`` (default run.dir/vstar, where ``megarl train`` with the same config finds it). Returns the
    written files. ``options`` go to ``vstar.estimate_file`` (``chunk``, ``stop_after_chunks``)."""
    from megarl.backends.megatron.generator import MegatronGenerator
    from megarl.backends.megatron.parallel import model_parallel
    from megarl.distributed import distributed
    from megarl.trainer.build import initial_model, reward_executor, train_files, vstar_files

    with distributed() as info:
        cfg.validate(info.world_size)
        with model_parallel(cfg.parallel.dims(), seed=cfg.run.seed) as layout:
            _, arch, tokenizer, model = initial_model(cfg)
            with reward_executor(cfg) as executor:
                return vstar_files(cfg, train_files(cfg), MegatronGenerator(model, arch), tokenizer, arch, executor,
                                   layout, out_dir, always=True, **options)
