"""The policy's optimizer: megatron-core's (chained, optionally distributed) optimizer with AdamW, or schedule-free
AdamW (the ``schedulefree`` package) inside the same wrappers, plus megatron-core's LR/WD scheduler.

Megatron's wrappers own what must be parallel-aware: copying DDP's ``main_grad`` into ``grad``, the gradient norm
over TP/PP without counting replicated parameters twice, clipping, bf16 main-weight copies, and the sharded
optimizer state for dist-checkpointing. Schedule-free AdamW (Defazio et al. 2024) is swapped in as the inner
torch optimizer, so it inherits all of that.

Schedule-free keeps two points: y, where gradients are taken (``train()`` mode), and the average x, the point
whose loss the method guarantees (``eval()`` mode). megarl samples rollouts and computes old log-probs at x, and
updates at y (as in the RPG repository, complex-reasoning/RPG@ec8e30b: verl's RPG calls ``eval()`` before old
log-probs and ``train()`` before the update). Checkpoints always hold y plus the optimizer state; the exported HF
model is x.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# keys of torch.optim.AdamW's param groups that mean nothing to schedule-free AdamW
_TORCH_ADAMW_KEYS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                     "decoupled_weight_decay")


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def build_optimizer(model_chunks: list[torch.nn.Module], *, name: str, lr: float, min_lr: float, weight_decay: float,
                    betas: tuple[float, float], grad_clip: float, bf16: bool, distributed: bool, warmup_steps: int,
                    total_steps: int, schedule: str):
    """(optimizer, scheduler) for DDP-wrapped model chunks. ``total_steps`` counts optimizer steps."""
    config = OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                             adam_beta1=betas[0], adam_beta2=betas[1], clip_grad=grad_clip, bf16=bf16,
                             params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             use_distributed_optimizer=distributed)
    optimizer = get_megatron_optimizer(config, model_chunks)
    if name == "schedulefree":
        _use_schedulefree(optimizer, betas)
    elif name != "adamw":
        raise ValueError(f"optim.name='{name}' is unknown; use 'adamw' or 'schedulefree'.")
    decay_style = {"constant": "constant", "cosine": "cosine"}[schedule]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup_steps else lr, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup_steps,
        lr_decay_steps=max(total_steps, warmup_steps + 1), lr_decay_style=decay_style, start_wd=weight_decay,
        end_wd=weight_decay, wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
        # on resume the schedule follows the current config (a longer train.steps stretches the cosine), and the
        # step count comes from the checkpoint
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    return optimizer, scheduler


def zero_grad(optimizer) -> None:
    """``optimizer.zero_grad()`` without torch's non-leaf ``.grad`` warning: megatron-core's distributed optimizer
    keeps slices of fp32 parameters (views, so non-leaf tensors) in its groups and its ``zero_grad`` reads their
    ``.grad``, which torch flags on every run. Harmless: Megatron's gradients live in ``main_grad``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        optimizer.zero_grad()


def _use_schedulefree(optimizer, betas: tuple[float, float]) -> None:
    try:
        from schedulefree import AdamWScheduleFree
    except ImportError as e:  # upstream verl silently falls back to AdamW; a different algorithm is not a fallback
        raise ImportError("optim.name=schedulefree needs the schedulefree package: pip install schedulefree.") from e
    for sub in _sub_optimizers(optimizer):
        if sub.optimizer is None:
            continue
        groups = [{k: v for k, v in g.items() if k not in _TORCH_ADAMW_KEYS} for g in sub.optimizer.param_groups]
        sub.optimizer = AdamWScheduleFree(groups, lr=groups[0]["lr"], betas=betas)
        sub.init_state_fn = _init_schedulefree_state
        sub.optimizer.train()


def _init_schedulefree_state(opt, config=None) -> None:
    """Empty state of every parameter (dist-checkpoint loading needs the tensors to exist before it fills them)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if "z" not in opt.state[p]:
                opt.state[p]["z"] = torch.clone(p.detach())
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p)


def set_eval_point(optimizer, evaluate: bool) -> None:
    """Schedule-free only: put the model at x (``evaluate=True``) or back at y. A no-op for AdamW."""
    for sub in _sub_optimizers(optimizer):
        inner = sub.optimizer
        if inner is None or not hasattr(inner, "eval"):
            continue
        inner.eval() if evaluate else inner.train()
        if hasattr(sub, "_copy_main_params_to_model_params"):  # bf16: the fp32 main copy moved; follow it
            sub._copy_main_params_to_model_params()


def is_schedulefree(optimizer) -> bool:
    return any(hasattr(getattr(sub, "optimizer", None), "eval") for sub in _sub_optimizers(optimizer))


@contextlib.contextmanager
def averaged_weights(optimizer):
    """Schedule-free: inside, the parameters hold x = y + (1 - 1/beta1) (z - y) (what ``eval()`` computes), made out
    of place; after, exactly the y tensors they held before -- unlike ``eval()`` then ``train()``, whose two lerps
    round. For checkpoints and exports, which must not perturb training. Holds one extra copy of the weights."""
    swaps = []
    for sub in _sub_optimizers(optimizer):
        inner = sub.optimizer
        if inner is None or not hasattr(inner, "eval"):
            continue
        for group in inner.param_groups:
            if not group.get("train_mode", True):
                continue  # already at x
            for p in group["params"]:
                z = inner.state[p].get("z")
                if z is not None:
                    swaps.append((p, p.data))
                    p.data = torch.lerp(p.data, z.to(p.device), 1 - 1 / group["betas"][0])
    if not swaps:  # AdamW, or already at x
        yield
        return
    _copy_main_to_model(optimizer)
    try:
        yield
    finally:
        for p, y in swaps:
            p.data = y
        _copy_main_to_model(optimizer)


def _copy_main_to_model(optimizer) -> None:
    for sub in _sub_optimizers(optimizer):  # bf16: model weights are copies of the fp32 main weights
        if getattr(sub, "optimizer", None) is not None and hasattr(sub, "_copy_main_params_to_model_params"):
            sub._copy_main_params_to_model_params()
