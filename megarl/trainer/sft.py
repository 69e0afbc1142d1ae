"""Supervised fine-tuning (``megarl sft``): a warm-up before RL when the starting model never writes the task's
answer format, so every rollout scores the same and no RL loss has a signal (docs/sft.md).

    for step in 1..train.steps:
        rows    = the next train.prompts_per_step rows of data.train_files (seeded order, epochs follow each other)
        targets = each row's extra_info.response (`megarl data kk` writes a worked solution), then EOS
        update  = one optimizer step on the token-mean negative log-likelihood of the targets (losses/sft.py)
    checkpoint every checkpoint.interval (a killed run resumes); the result as an HF model in run.dir/hf

It is the RL trainer's machinery without rollouts: the same prompt rendering (``PromptSource``), policy, parallel
layout, micro-batching/packing, optimizer, checkpoints and metrics; RL keys of the config are unused.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from megarl.config import RunConfig, to_dict
from megarl.data.parquet import DataError
from megarl.data.source import Prompt, PromptSource
from megarl.losses.sft import sft_loss
from megarl.metrics import MetricsLogger
from megarl.rollout.batch import Rollouts
from megarl.trainer.build import initial_model, make_policy, train_files
from megarl.trainer.state import prepare_run_dir
from megarl.trainer.state import resume, save_checkpoint

RESPONSE_KEY = "response"  # extra_info.response: the target text of a row


def check_targets(source: PromptSource) -> None:
    """Every row has a non-empty target; else a DataError naming the file, the row and the fix."""
    for path, i, row in source.rows:
        target = row["extra_info"].get(RESPONSE_KEY)
        if not isinstance(target, str) or not target.strip():
            raise DataError(f"{path} row {i}: no extra_info.{RESPONSE_KEY} (the text to fine-tune on after the "
                            f"prompt); `megarl data kk` writes one (a worked solution); other data needs it added.")


def target_rollouts(prompts: list[Prompt], tokenizer) -> Rollouts:
    """Prompts with their target responses (tokenized without special tokens, then the tokenizer's EOS, which the
    model must learn to stop with) as the rows of a ``Rollouts``: one group per prompt."""
    responses = [tokenizer(p.extra_info[RESPONSE_KEY], add_special_tokens=False)["input_ids"] +
                 [tokenizer.eos_token_id] for p in prompts]
    return Rollouts([p.ids for p in prompts], responses, [[0.0] * len(r) for r in responses],
                    ["stop"] * len(prompts), torch.tensor([p.uid for p in prompts], dtype=torch.int64))


def sft(cfg: RunConfig, layout) -> dict[str, float]:
    """Fine-tune model.hf_dir on data.train_files' targets for train.steps optimizer steps (or resume them);
    writes run.dir/hf (unless checkpoint.export_hf=false) and returns the last step's metrics."""
    prepare_run_dir(cfg)
    model_dir, arch, tokenizer, model = initial_model(cfg)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{model_dir}: the tokenizer has no EOS token, so a fine-tuned model could not learn to stop.")
    policy = make_policy(cfg, model, arch, model_dir, cfg.train.steps)
    source = PromptSource(train_files(cfg), tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
                          seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    check_targets(source)
    loss = sft_loss()
    step, position = resume(cfg.run.dir, policy)
    per_rank = cfg.train.prompts_per_step // layout.dp_size
    metrics: dict[str, float] = {}
    with MetricsLogger(cfg.run.dir, total_steps=cfg.train.steps, start_step=step, enabled=dist.get_rank() == 0,
                       progress=cfg.metrics.progress, tensorboard=cfg.metrics.tensorboard, wandb=cfg.metrics.wandb,
                       wandb_project=cfg.metrics.wandb_project, config=to_dict(cfg)) as log:
        while step < cfg.train.steps:
            step, t0 = step + 1, time.perf_counter()
            ro = target_rollouts(source.take(position + layout.dp_rank * per_rank, per_rank), tokenizer)
            position += cfg.train.prompts_per_step
            metrics = policy.train_step(ro, ro.groups(), loss, cfg.train.micro_batch_tokens, 1.0)
            metrics["time/step"] = time.perf_counter() - t0
            metrics["sft/epoch"] = position / len(source)
            log.log(step, metrics)
            if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == cfg.train.steps:
                save_checkpoint(cfg, policy, step, position)
    if cfg.checkpoint.export_hf:
        policy.export_hf(Path(cfg.run.dir) / "hf")
        if dist.get_rank() == 0:
            print(f"fine-tuned model: {Path(cfg.run.dir) / 'hf'} (train on it with model.hf_dir=...)", flush=True)
    return metrics
