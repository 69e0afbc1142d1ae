"""The RL loop. Every rank runs it; Megatron's groups split the work (TP/PP inside a replica, prompts over DP).

    for step in 1..train.steps:
        rollouts   = n samples of each prompt at the policy's rollout point      (vLLM, weights synced and
                                                                                 checked; or native Megatron)
                     (rollout.max_staleness=k >= 1: the round submitted last step and sampled during its update;
                      the next step's round is submitted before this step's update, with the weights of now, or
                      for k >= 2 with the engines' older ones while that keeps it within k steps; with partial
                      rollouts k rounds in flight, taking new weights mid-sequence; docs/async.md)
        rewards    = rule rewards (+ DAPO overlong shaping; dynamic sampling drops uninformative groups)
        old, ref   = log-probs of the samples under pi_old and the reference     (ref := old for RPG)
        advantages = the configured estimator over the whole step               (TRPA levels, A*-PO V* ride along)
        for each mini-batch: one optimizer step over equal-shaped micro-batches with global normalisers
        log metrics; checkpoint every checkpoint.interval; evaluate every eval.interval (run.dir/eval.jsonl)
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import torch.distributed as dist

from megarl.config import RunConfig, to_dict
from megarl.metrics import MetricsLogger, Timer, append_jsonl, read_metrics
from megarl.rollout.batch import split_groups
from megarl.trainer.build import Components
from megarl.trainer.collect import Round, advantages_over_dp, balance_over_dp, collect, select_over_dp, submit_round
from megarl.trainer.evaluate import evaluate_files
from megarl.trainer.state import resume, save_checkpoint, step_metrics


MAX_NONFINITE_STEPS = 3


def train(c: Components) -> dict[str, float]:
    """Run (or resume) the configured RL training; returns the last step's metrics."""
    cfg = c.cfg
    dp_rank, dp_size, dp_group = c.layout.dp_rank, c.layout.dp_size, c.layout.dp_group
    step, position = resume(cfg.run.dir, c.policy)
    log = MetricsLogger(cfg.run.dir, total_steps=cfg.train.steps, start_step=step, enabled=dist.get_rank() == 0,
                        progress=cfg.metrics.progress, tensorboard=cfg.metrics.tensorboard, wandb=cfg.metrics.wandb,
                        wandb_project=cfg.metrics.wandb_project, config=to_dict(cfg))
    temperature = cfg.rollout.temperature or 1.0
    budget, per_rank = cfg.train.micro_batch_tokens, cfg.train.prompts_per_step // dp_size
    lp_budget = cfg.train.logprob_micro_batch_tokens or budget  # forward-only passes
    async_k = cfg.rollout.max_staleness  # 0: synchronous; 1: one-step-off; k >= 2: lazy weight pushes (docs/async.md)
    collect_args = dict(generator=c.generator, tokenizer=c.tokenizer, executor=c.executor, prompts_per_rank=per_rank,
                        dp_size=dp_size, dp_group=dp_group, dynamic_sampling=cfg.rollout.dynamic_sampling,
                        max_rounds=cfg.rollout.max_sampling_rounds,
                        reward_opts=dict(max_tokens=cfg.rollout.max_tokens, overlong_buffer=cfg.rollout.overlong_buffer,
                                         overlong_factor=cfg.rollout.overlong_factor))

    def sync(into: dict) -> None:  # the generator takes the policy's weights if they moved; metrics join ``into``
        if c.generator.stale:
            into.update(c.generator.sync())

    held: int | None = None  # loop steps taken by the weights the generator samples with (None: unknown)

    def note_held(steps_taken: int) -> None:  # after any use that syncs a stale generator (rounds, eval)
        nonlocal held
        if not c.generator.stale:
            held = steps_taken

    def submit(for_step: int, at: int, synced: dict | None = None, keep: bool = False) -> Round:
        """A round of prompts from stream position ``at``, sampled with the weights of now (synced first), which
        have taken ``step - 1`` steps, ``step`` being the loop's current one; ``keep``: with the weights the
        generator holds, which may be older (``held``)."""
        if synced is not None and not keep:
            sync(synced)
        note_held(step - 1)
        return submit_round(c.generator, c.source, at, held, step=for_step, n=cfg.rollout.group_size,
                            sampling=c.sampling, prompts_per_rank=per_rank, dp_rank=dp_rank, dp_size=dp_size,
                            refresh=not keep)

    metrics: dict[str, float] = {}
    # the next steps' first rounds, in flight: one (max_staleness >= 1), or k with partial rollouts (docs/async.md)
    queue: deque[Round] = deque()
    depth = async_k if cfg.rollout.partial else min(async_k, 1)
    nonfinite = 0  # consecutive steps whose every update was skipped for a NaN/inf loss or gradient
    with log:
        if step == 0 and cfg.eval.before_train and cfg.data.val_files:
            before = record_eval(cfg, 0, evaluate_files(c, list(cfg.data.val_files)))
            log.write("eval before training  " + "  ".join(f"{k}={v:.4f}" for k, v in before.items()))
        while step < cfg.train.steps:
            step, timer, t0 = step + 1, Timer(), time.perf_counter()
            c.policy.rollout_point(True)  # schedule-free: sample and score pi_old at the averaged point x
            synced: dict[str, float] = {}
            # else the engines still sample rounds submitted earlier; with partial rollouts they take the new
            # weights in the middle of them (docs/async.md)
            if not queue or cfg.rollout.partial:
                sync(synced)
            with timer("generation"):
                first = queue.popleft() if queue else submit(step, position)
                ro, position, stats = collect(first, lambda at: submit(step, at, synced), now=step - 1,
                                              **collect_args)
                # one-step-off: the next step's first round samples with these weights while this step trains;
                # k >= 2: with the engines' own while it will be trained at most k steps after them; partial: the
                # queue holds k rounds, for the next k steps
                keep = async_k >= 2 and not cfg.rollout.partial and held is not None and step - held <= async_k
                while len(queue) < depth and step + len(queue) < cfg.train.steps:  # refill, in stream order
                    queue.append(submit(step + 1 + len(queue), queue[-1].end if queue else position, synced, keep))
            c.generator.sleep()  # colocated vLLM on CUDA: give its memory to the update
            if cfg.train.balance_tokens:  # replicas get equal token counts, not equal prompt counts
                ro = balance_over_dp(ro, dp_group, dp_size)
            with timer("old_logprobs"):  # bypass: the sampler's log-probs are pi_old (megarl/losses/correction.py)
                ro.old_logprobs, entropy = (ro.rollout_logprobs(), None) if cfg.algo.bypass_old_logprobs else \
                    c.policy.logprobs(ro, lp_budget, temperature)
            with timer("ref_logprobs"):
                ro.ref_logprobs = {"old": ro.old_logprobs, "none": None}.get(c.ref_kind) if c.reference is None \
                    else c.reference.logprobs(ro, lp_budget, temperature)
            c.policy.rollout_point(False)
            ro.advantages, rollout_metrics = advantages_over_dp(ro, c.algo.advantage, dp_group)
            ro.selected = select_over_dp(ro, c.algo.loss, dp_group, seed=cfg.run.seed * 100_003 + step)
            with timer("update"):
                updates = [c.policy.train_step(ro, groups, c.algo.loss, budget, temperature)
                           for groups in split_groups(ro.groups(), cfg.train.minibatches_per_step)]
            metrics = step_metrics(ro, entropy, updates, stats, rollout_metrics, timer, time.perf_counter() - t0,
                                   dp_group, None if cfg.algo.bypass_old_logprobs else c.algo.loss.correction,
                                   now=step - 1)
            metrics.update(synced)
            nonfinite = nonfinite + 1 if metrics.get("optim/nonfinite", 0.0) > 0 else 0
            if cfg.eval.interval and step % cfg.eval.interval == 0 and cfg.data.val_files:
                with timer("eval"):
                    metrics.update(record_eval(cfg, step, evaluate_files(c, list(cfg.data.val_files))))
                note_held(step)  # the evaluation synced a stale generator: it holds this step's weights
            log.log(step, metrics)
            if nonfinite >= MAX_NONFINITE_STEPS:
                raise ValueError(f"step {step}: the loss or the gradients were NaN/inf in {nonfinite} steps in a row, "
                                 f"so no update was made since step {step - nonfinite + 1} (weights unchanged; see "
                                 f"loss/* in {cfg.run.dir}/metrics.jsonl). Lower optim.lr, check the reward's scale, "
                                 "or the loss hyperparameters.")
            if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == cfg.train.steps:
                save_checkpoint(cfg, c.policy, step, position)
        if cfg.data.val_files and not (cfg.eval.interval and step % cfg.eval.interval == 0) and \
                step not in {r["step"] for r in read_metrics(Path(cfg.run.dir) / "eval.jsonl")}:  # (a re-run)
            final = evaluate_files(c, list(cfg.data.val_files))
            log.write("eval  " + "  ".join(f"{k}={v:.4f}" for k, v in final.items()))
            record_eval(cfg, step, final)
    if cfg.checkpoint.export_hf:
        c.policy.export_hf(Path(cfg.run.dir) / "hf")
    c.executor.close()
    return metrics


def record_eval(cfg: RunConfig, step: int, results: dict[str, float]) -> dict[str, float]:
    """Append an evaluation to run.dir/eval.jsonl (main rank); returns ``results``."""
    if dist.get_rank() == 0:
        append_jsonl(Path(cfg.run.dir) / "eval.jsonl", {"step": step, **results})
    return results
