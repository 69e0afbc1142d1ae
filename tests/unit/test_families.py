"""Every algorithm family of `megarl demo --algo` is a valid configuration, and its loss runs on what every task's
reward produces (levels for TRPA, one sample per prompt for A*-PO): a family that needs something a task's reward
does not give fails here, at config time, not in the middle of a run."""

from __future__ import annotations

import pytest
import torch

from megarl.advantages import compute_advantages
from megarl.algo import resolve
from megarl.demo import ALGOS, demo_config
from megarl.losses import LossInput, build_loss
from megarl.rewards import compute_score

KK = {"solution_text_format": "(1) Zoey is a knight\n(2) Oliver is a knave"}
# one prompt's group per task: (data_source, ground truth, responses) with right, wrong and unparseable answers
TASKS = {
    "kk": ("kk_logic", KK, ["x</think><answer>(1) Zoey is a knight\n(2) Oliver is a knave</answer>",
                            "x</think><answer>(1) Zoey is a knave\n(2) Oliver is a knave</answer>",
                            "x</think><answer>Zoey: knight</answer>", "no tags"]),
    "gsm8k": ("openai/gsm8k", "18", ["so #### 18", "so #### 17", "eighteen", "#### 18.5"]),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "\\frac{1}{2}", ["$\\boxed{\\frac12}$", "$\\boxed{2}$",
                                                                    "$\\boxed{}$", "one half"]),
    "dapo_math": ("math_dapo", "34", ["Answer: 34", "Answer: 35", "I think 34", "Answer: 3 4"]),
    "aime": ("aime2024", "204", ["Answer: 204", "Answer: 20", "no idea", "Answer: 204"]),
    "arithmetic": ("arithmetic", "12", ["12", "It is 13.", "twelve", "7 + 5 = 12"]),
}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_family_is_a_valid_config(algo, tmp_path):
    cfg = demo_config(algo, [f"run.dir={tmp_path / algo}"]).validate(world_size=1)
    build_loss(cfg.algo.loss, **cfg.algo.loss_hparams)  # the family's loss and hyperparameters exist


def loss_input(task: str, n_groups: int, group_size: int) -> LossInput:
    """A batch of ``n_groups`` prompts of ``task`` scored by its real reward, with random log-probs."""
    source, truth, texts = TASKS[task]
    results = [compute_score(source, texts[(g + j) % len(texts)], truth)
               for g in range(n_groups) for j in range(group_size)]
    B, T = len(results), 5
    gen = torch.Generator().manual_seed(B)
    old = -torch.rand(B, T, generator=gen) - 0.1
    return LossInput(logprobs=(old + 0.1 * torch.randn(B, T, generator=gen)).requires_grad_(True),
                     old_logprobs=old, ref_logprobs=old + 0.05 * torch.randn(B, T, generator=gen),
                     mask=torch.ones(B, T), rewards=torch.tensor([float(r["score"]) for r in results]),
                     group_ids=torch.arange(n_groups).repeat_interleave(group_size),
                     levels=torch.tensor([int(r["level"]) for r in results]),
                     v_star=torch.full((B,), 0.2), entropy=torch.rand(B, T, generator=gen))


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_family_trains_on_every_task(algo, task, tmp_path):
    cfg = demo_config(algo, [f"run.dir={tmp_path / algo}"])
    plan = resolve(cfg)  # the loss and the estimator the trainer runs for it
    inp = loss_input(task, n_groups=2, group_size=cfg.rollout.group_size)
    if plan.advantage:
        inp.advantages = compute_advantages(plan.advantage, rewards=inp.rewards, group_ids=inp.group_ids,
                                            mask=inp.mask)
    loss, _ = plan.loss(inp)
    loss.backward()
    grad = inp.logprobs.grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_orders_its_answers_for_trpa(task):
    """Right answers are preferred over wrong ones, and wrong ones over answers with nothing to extract."""
    source, truth, texts = TASKS[task]
    levels = [compute_score(source, t, truth)["level"] for t in texts]
    assert levels[0] == 1 and levels[1] == 2 and max(levels[2:]) > 2
