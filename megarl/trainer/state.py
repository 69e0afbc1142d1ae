"""What the loop saves, restores and reports besides the update itself: the run directory, checkpoints and
resume, the HF export, the per-step metrics reduced over data parallel, and the check that a resumed run keeps its
algorithm."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megarl.backends.protocols import Policy
from megarl.config import RunConfig, load_config, save_config, to_dict
from megarl.distributed import all_reduce_sum
from megarl.losses import correction
from megarl.metrics import Timer, truncate_metrics
from megarl.rollout.batch import Rollouts
from megarl.trainer import checkpointing

# keys that may change between the runs of one run.dir (how long, how often, how parallel, where to log, which
# kernel computes the same log-probs, what is recomputed instead of stored)
RESUMABLE_CHANGES = ("train.steps", "checkpoint.", "eval.", "metrics.", "parallel.", "kernels.", "model.recompute",
                     "reward.num_workers", "reward.timeout_s", "data.val_files", "run.dir")  # run.dir: a moved run


def check_compatible(cfg: RunConfig, saved: Path) -> None:
    """Refuse to continue a run.dir whose earlier config differs in anything but RESUMABLE_CHANGES."""
    if not saved.is_file():
        return
    old, new = _flat(to_dict(load_config(saved))), _flat(to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
               and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise ValueError(f"{saved}: run.dir holds a run with other settings ({diff}). Resuming would mix two "
                         f"experiments; use a new run.dir, or the same settings (only train.steps, checkpoint.*, "
                         f"eval.*, metrics.*, parallel.*, kernels.*, model.recompute, reward workers, run.dir may "
                         f"change).")


def prepare_run_dir(cfg: RunConfig) -> None:
    """Main rank: create run.dir, refuse an incompatible earlier config, write the resolved one, drop stale
    temporaries and metrics past the checkpoint that will be resumed."""
    run = Path(cfg.run.dir)
    if dist.get_rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
        check_compatible(cfg, run / "config.yaml")
        save_config(cfg, run / "config.yaml")
        checkpointing.remove_partial(run)
        latest = checkpointing.latest_checkpoint(run, verify=True)
        last = int(latest.name.split("_")[1]) if latest else 0
        truncate_metrics(run / "metrics.jsonl", last)
        # from scratch, eval.before_train runs again: drop its earlier step-0 line rather than repeat it
        truncate_metrics(run / "eval.jsonl", last if latest else -1)
    dist.barrier()
    torch.manual_seed(cfg.run.seed)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def resume(run_dir: str | Path, policy: Policy) -> tuple[int, int]:
    """(step, prompt-stream position) of the latest checkpoint of ``run_dir``, with every state restored (the
    policy's, the RNG's); (0, 0) when there is none."""
    # the newest intact one: prepare_run_dir checked the checksums and set damaged checkpoints aside
    latest = checkpointing.latest_checkpoint(run_dir)
    if latest is None:
        return 0, 0
    policy.load(latest, json.loads((latest / "trainer_state.json").read_text()))
    state = checkpointing.load_trainer_state(latest)  # (and every rank's RNG states)
    if dist.get_rank() == 0:
        print(f"resumed from {latest} (step {state['step']})", flush=True)
    return int(state["step"]), int(state["position"])


def save_checkpoint(cfg: RunConfig, policy: Policy, step: int, position: int) -> Path:
    """run.dir/checkpoints/step_N: the policy's own files (``Policy.save``: for Megatron also a model checkpoint for
    ``megarl eval``, ``mcore-to-hf`` and ``megarl export``), the step, the prompt stream's position and the RNG."""
    state = {"step": step, "position": position}
    return checkpointing.save(cfg.run.dir, step, state, lambda tmp: state.update(policy.save(tmp)),
                              cfg.checkpoint.keep_last)


def step_metrics(ro: Rollouts, entropy: torch.Tensor | None, updates: list[dict], stats: dict[str, float],
                 global_metrics: dict[str, float], timer: Timer, seconds: float, dp_group,
                 correction_hp: dict | None = None, now: int = 0) -> dict[str, float]:
    """Metrics of one step, equal on every rank: ``stats`` (this replica's counters) summed over replicas,
    ``global_metrics`` (already over all replicas) as they are, update statistics averaged over the step's
    mini-batches, timings and throughput; the rollout-vs-trainer mismatch (``rollout_corr/``) unless
    ``correction_hp`` is None (bypass: pi_old is the sampler's, nothing to compare). ``entropy`` None: no
    old-log-prob pass ran (bypass), so no actor/entropy. ``now``: optimizer steps the trained weights had taken;
    a sample's staleness is that minus its ``versions`` entry."""
    mine = ("rollout/rounds", "rollout/queue_wait_seconds")  # equal on every rank / this rank's own wait
    out = all_reduce_sum({k: v for k, v in stats.items() if k not in mine}, dp_group)
    out.update({"rollout/rounds": stats.get("rollout/rounds", 1.0),
                "rollout/queue_wait_seconds": stats.get("rollout/queue_wait_seconds", 0.0)})
    stale = (now - ro.versions).double() if len(ro) and ro.versions is not None else torch.zeros(0)
    out.update(global_metrics)
    mask = ro.response_mask() if len(ro) else torch.zeros(0, 1)
    diff, sampler = 0.0, ro.rollout_logprobs() if len(ro) else None
    # partial rollouts: the tokens sampled with the weights being trained (after each sample's switch)
    switched = None if not len(ro) or ro.switch_at is None else \
        mask * (torch.arange(mask.shape[1])[None, :] >= ro.switch_at[:, None]).float()
    diff_new = 0.0
    if len(ro):
        gap = (sampler - ro.old_logprobs).abs()
        diff = float((gap * mask).max())
        diff_new = 0.0 if switched is None else float((gap * switched).max())
    peaks = all_reduce_sum({"d": diff, "s": float(stale.max()) if len(stale) else 0.0, "dn": diff_new}, dp_group,
                           dist.ReduceOp.MAX)
    out["rollout/logprob_diff_max"], out["rollout/staleness_max"] = peaks["d"], peaks["s"]
    if correction_hp is not None:
        out.update(mismatch_metrics(ro, sampler, mask, correction_hp, dp_group))
    tokens = float(sum(len(p) + len(r) for p, r in zip(ro.prompt_ids, ro.response_ids)))
    sums = all_reduce_sum({"ent": float((entropy * mask).sum()) if len(ro) and entropy is not None else 0.0,
                           "n": float(mask.sum()), "tokens": tokens, "groups": float(len(ro.groups())),
                           "stale": float(stale.sum()), "rows": float(len(stale)),
                           # partial rollouts (in the same reduction: a rank with no rows has no switch points)
                           "switched": 0.0 if switched is None else float((switched.sum(-1) > 0).sum()),
                           "segmented": 0.0 if switched is None else float(len(ro))}, dp_group)
    out["rollout/staleness_mean"] = sums["stale"] / max(sums["rows"], 1.0)
    if sums["segmented"]:
        out["rollout/partial_fraction"] = sums["switched"] / sums["segmented"]
        out["rollout/partial_logprob_diff_max"] = peaks["dn"]
    if entropy is not None:
        out["actor/entropy"] = sums["ent"] / max(sums["n"], 1.0)
    out["rollout/groups"] = sums["groups"]
    out["perf/tokens_per_s"] = sums["tokens"] / max(seconds, 1e-9)
    for k in sorted({k for u in updates for k in u}):
        vals = [u[k] for u in updates if k in u]
        out[k] = sum(vals) / len(vals)
    out.update(timer.metrics())
    out["time/step"] = seconds
    return out


def mismatch_metrics(ro: Rollouts, sampler: torch.Tensor | None, mask: torch.Tensor, hp: dict,
                     dp_group) -> dict[str, float]:
    """rollout_corr/ metrics of the step over all replicas (megarl/losses/correction.py ``stats``)."""
    local = correction.stats(ro.old_logprobs, sampler, mask, hp) if len(ro) else \
        correction.stats(torch.zeros(0, 1), torch.zeros(0, 1), torch.zeros(0, 1), hp)
    peak = all_reduce_sum({"is_max": local.pop("is_max")}, dp_group, dist.ReduceOp.MAX) if "is_max" in local else {}
    return correction.finish_stats({**all_reduce_sum(local, dp_group), **peak})
