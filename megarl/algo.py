"""The configured algorithm: the loss's registry entry (megarl/losses/registry.py) combined with the run config.

    loss       algo.loss with its defaults and algo.loss_hparams (Dr. GRPO's norm_len defaults to rollout.max_tokens)
    advantage  algo.advantage; "auto" = the loss's own estimator (None for losses that read no advantages: TRPA
               reads preference levels, A*-PO its V* targets); an explicit other estimator runs and is said
    reference  algo.reference; "auto" = the loss's own ("fixed", "old" or "none")

``resolve`` raises a ValueError naming the config key and the fix for every combination that cannot run, so a
bad config fails before any model is built. It never tests a loss's name: each fact comes from the entry.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING

from megarl.advantages import ADVANTAGES, GROUP_RELATIVE
from megarl.losses import correction
from megarl.losses.registry import LOSSES, PolicyLoss, build_loss

if TYPE_CHECKING:
    from megarl.config import RunConfig


@dataclasses.dataclass(frozen=True)
class Algorithm:
    loss: PolicyLoss
    advantage: str | None  # the estimator run every step; None when the loss reads no advantages
    reference: str  # "fixed" | "old" | "none"
    notes: tuple[str, ...] = ()  # said at the start of the run

    def describe(self) -> str:
        adv = self.advantage or f"none (the loss reads {', '.join(sorted(self.loss.spec.reads)) or 'no advantages'})"
        return f"algorithm: loss {self.loss.name}, advantage {adv}, reference {self.reference}"


def loss_hparams(cfg: RunConfig) -> dict:
    """The loss's defaults and the config's overrides; a ``norm_len`` left None is the generation budget."""
    if cfg.algo.loss not in LOSSES:
        build_loss(cfg.algo.loss)  # raises the named error with the known losses
    hp = {**LOSSES[cfg.algo.loss].defaults, **cfg.algo.loss_hparams}
    if "norm_len" in hp and hp["norm_len"] is None:
        hp["norm_len"] = float(cfg.rollout.max_tokens)
    return hp


def _advantage(cfg: RunConfig, loss: PolicyLoss) -> tuple[str | None, list[str]]:
    choice, own = cfg.algo.advantage, loss.spec.advantage
    if choice == "auto":
        return own, []
    if choice not in ADVANTAGES:
        close = difflib.get_close_matches(choice, ADVANTAGES, n=1)
        raise ValueError(f"algo.advantage='{choice}' is unknown; known: auto, {', '.join(ADVANTAGES)}."
                         + (f" Did you mean '{close[0]}'?" if close else ""))
    if own is None:
        raise ValueError(f"algo.advantage='{choice}' but loss '{loss.name}' reads no advantages (it reads "
                         f"{', '.join(sorted(loss.spec.reads))}); leave algo.advantage=auto.")
    notes = [] if choice == own else [f"algo.advantage={choice}: not loss '{loss.name}''s own estimator ({own}); "
                                      f"running {choice} as configured"]
    return choice, notes


def resolve(cfg: RunConfig) -> Algorithm:
    """The algorithm of ``cfg`` (module docstring); raises ValueError for a combination that cannot run."""
    loss = build_loss(cfg.algo.loss, **loss_hparams(cfg))  # unknown loss / hyperparameter -> named error
    advantage, notes = _advantage(cfg, loss)
    if cfg.kernels.impl == "te" and "entropy" in loss.needs():
        raise ValueError(f"kernels.impl='te' gives log-probs only, and algo.loss='{loss.name}' reads the entropy "
                         "(with these hyperparameters); use kernels.impl=auto or triton, or set "
                         "algo.loss_hparams={entropy_coef: 0} where the loss has one.")
    need = max(loss.spec.min_group_size, 2 if advantage in GROUP_RELATIVE else 1)
    if cfg.rollout.group_size < need:
        who = f"algo.advantage='{advantage}'" if loss.spec.min_group_size < need else f"loss '{loss.name}'"
        raise ValueError(f"rollout.group_size={cfg.rollout.group_size} leaves nothing to compare against; {who} "
                         f"compares responses of one prompt and needs >= {need}. Set rollout.group_size>={need}.")
    reference = loss.reference_kind() if cfg.algo.reference == "auto" else cfg.algo.reference
    if reference == "none" and loss.reference_kind() != "none":
        raise ValueError(f"algo.reference=none but loss '{loss.name}' regularises toward a reference "
                         f"({loss.reference_kind()}); use algo.reference=auto, or set its kl_coef to 0 in "
                         f"algo.loss_hparams where it has one.")
    truncated = cfg.rollout.top_p < 1.0 or cfg.rollout.top_k > 0
    if truncated and (cfg.algo.bypass_old_logprobs or correction.active(loss.correction)):
        notes.append(f"rollout.top_p={cfg.rollout.top_p} / top_k={cfg.rollout.top_k}: the sampler's log-probs are "
                     "those of the truncated, renormalised distribution, not the trainer's full-vocabulary pi_old; "
                     "rollout correction and bypass treat that difference as mismatch (docs/rollout_correction.md)")
    return Algorithm(loss, advantage, reference, tuple(notes))
