"""Name -> loss, with each loss's own defaults and the facts the trainer reads about it (``LossSpec``).

``build_loss(name, **overrides)`` is the only constructor. Nothing outside megarl/losses tests a loss's name: the
trainer asks the entry (which advantage estimator, which reference, which inputs, which normalisers, which stage
before training); ``megarl/algo.py`` combines that with the run configuration.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from megarl.losses import astar_po, correction, cov, peers, ppo, rpg, trpa, trw
from megarl.losses.base import LossInput, local_counts, token_mask

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    defaults: Mapping[str, Any]
    counts: Callable[[LossInput], dict[str, float]] | None = None  # None: tokens and seqs
    advantage: str | None = "grpo"  # its paper's estimator (megarl.advantages); None: it reads no advantages
    # the policy its KL terms regularise toward: "fixed" (the initial model), "old" (the rollout policy: RPG and
    # REINFORCE++ as RPG runs them), or "kl": a fixed reference exactly when its kl_coef > 0
    reference: str = "kl"
    reads: frozenset[str] = frozenset()  # LossInput fields it always reads besides log-probs: levels, v_star, ...
    min_group_size: int = 1  # responses per prompt the loss itself compares (TRPA's pairs: 2)
    normalisers: tuple[str, ...] = ("tokens", "seqs")  # the keys of counts(): summed over micro-batches and DP
    stage1: str | None = None  # a stage before training: "vstar" (A*-PO's offline V*, megarl/trainer/vstar.py)
    rollout_is: tuple[str, ...] = correction.IS_MODES  # the IS-weight modes its terms can take (losses/correction)
    # a token selection made once per step over all ranks (cov, mask, hparams, generator) -> [B, T]: the trainer
    # passes it as LossInput.selected (Clip-Cov / KL-Cov, megarl/losses/cov.py)
    select: Callable[..., torch.Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """A loss with its hyperparameters bound. ``loss(inp) -> (scalar, metrics)``.

    ``counts(inp)`` gives the additive normalisers of one micro-batch; sum them over the mini-batch and DP ranks
    and pass the sums as ``LossInput.counts`` to make micro-batching exact (see ``megarl.losses.base``).
    ``hparams`` holds the loss's own and the rollout-correction keys (``megarl.losses.correction``); both calls
    apply the correction first, so rejected tokens leave the loss and its normalisers alike.
    """

    name: str
    hparams: Mapping[str, Any]
    spec: LossSpec

    @property
    def whole_groups(self) -> bool:
        """Whether the loss compares the responses of one prompt inside a micro-batch (it reads ``group_ids``,
        e.g. TRPA's pairs), so a packed micro-batch must hold whole groups."""
        return "group_ids" in self.spec.reads

    @property
    def correction(self) -> dict[str, Any]:
        return {k: self.hparams[k] for k in correction.CORRECTION_DEFAULTS}

    def __call__(self, inp: LossInput) -> tuple[torch.Tensor, dict[str, float]]:
        own = {k: v for k, v in self.hparams.items() if k not in correction.CORRECTION_DEFAULTS}
        return self.spec.fn(correction.corrected(inp, self.correction), **own)

    def counts(self, inp: LossInput) -> dict[str, float]:
        inp = correction.corrected(inp, self.correction)
        return self.spec.counts(inp) if self.spec.counts else local_counts(token_mask(inp))

    def reference_kind(self) -> str:
        """'fixed', 'old' or 'none': the reference its paper regularises toward (LossSpec.reference)."""
        if self.spec.reference != "kl":
            return self.spec.reference
        return "fixed" if float(self.hparams.get("kl_coef") or 0.0) > 0 else "none"

    def needs(self) -> frozenset[str]:
        """The optional LossInput fields this loss reads with these hyperparameters."""
        extra = {"entropy"} if self.hparams.get("entropy_coef") else set()
        if self.reference_kind() != "none":
            extra.add("ref_logprobs")
        return self.spec.reads | extra


def _rpg_entries() -> dict[str, LossSpec]:
    out = {}
    for div in rpg.DIVERGENCES:
        # the RPG paper: group-mean baseline without std, regularised toward the old policy every step
        meta = dict(advantage="rpg", reference="old")
        out[f"rpg_{div}"] = LossSpec(functools.partial(rpg.rpg_differentiable, div=div), rpg.RPG_DEFAULTS, **meta)
        out[f"rpg_rf_{div}"] = LossSpec(functools.partial(rpg.rpg_reinforce, div=div, rpg_style_clip=False),
                                        rpg.RPG_DEFAULTS, **meta)
        out[f"rpg_rf_{div}_clip"] = LossSpec(functools.partial(rpg.rpg_reinforce, div=div, rpg_style_clip=True),
                                             rpg.RPG_DEFAULTS, **meta)
    return out


LOSSES: dict[str, LossSpec] = {
    "grpo": LossSpec(ppo.grpo, ppo.PPO_DEFAULTS),
    "dr_grpo": LossSpec(ppo.dr_grpo, {**ppo.PPO_DEFAULTS, "agg_mode": "seq-mean-token-sum-norm"},
                        advantage="dr_grpo"),
    "dapo": LossSpec(ppo.dapo, {**ppo.PPO_DEFAULTS, "clip_high": 0.28, "clip_c": 10.0, "kl_coef": 0.0}),
    "reinforce_pp": LossSpec(ppo.reinforce_pp, {**ppo.PPO_DEFAULTS, "clip_high": 0.28, "clip_c": 10.0,
                                                "kl_coef": 1e-4, "kl_estimator": "k1"},
                                 advantage="reinforce_pp_baseline", reference="old"),
    "trw_indicator": LossSpec(trw.trw_indicator, {"clip_low": 0.2, "clip_high": 0.2, "clip_c": 3.0,
                                                  **trw.TRW_COMMON}),
    "trw_triangular": LossSpec(trw.trw_triangular, {**trw.TRIANGLE, **trw.TRW_COMMON}),
    "trw_logistic": LossSpec(trw.trw_logistic, {"alpha": 10.0, "gamma": 1.0, "eta": 0.0, "rescale": False,
                                                **trw.TRW_COMMON}),
    # (its "entropy" boost measures rarity by pi_old(y_t), not by the token entropy: nothing more to read)
    "trw_entropy": LossSpec(trw.trw_entropy, {**trw.TRIANGLE, "lam": 0.5, **trw.TRW_COMMON}),
    # sequence-level objectives: TRPA's pairwise preferences have no policy-gradient term to reweight (rejection
    # still applies); A*-PO's squared residual per response takes one sequence weight
    "trpa": LossSpec(trpa.trpa, trpa.TRPA_DEFAULTS, trpa.trpa_counts, advantage=None, reference="fixed",
                     reads=frozenset({"levels", "group_ids"}), min_group_size=2,
                     normalisers=("tokens", "seqs", "pref_terms"), rollout_is=("none",)),
    "astar_po": LossSpec(astar_po.astar_po, astar_po.ASTAR_PO_DEFAULTS, advantage=None, reference="fixed",
                         reads=frozenset({"rewards", "v_star"}), stage1="vstar", rollout_is=("none", "sequence")),
    **_rpg_entries(),
    # what the peer frameworks ship (megarl/losses/peers.py): group advantages, no reference unless kl_coef > 0
    "gspo": LossSpec(peers.gspo, peers.GSPO_DEFAULTS),
    "gmpo": LossSpec(peers.gmpo, peers.GMPO_DEFAULTS, rollout_is=("none", "sequence")),
    "cispo": LossSpec(peers.cispo, peers.CISPO_DEFAULTS),
    "sapo": LossSpec(peers.sapo, peers.SAPO_DEFAULTS),
    "clip_cov": LossSpec(cov.clip_cov, cov.CLIP_COV_DEFAULTS, select=cov.clip_cov_select),
    "kl_cov": LossSpec(cov.kl_cov, cov.KL_COV_DEFAULTS, select=cov.kl_cov_select),
}


def _unknown(kind: str, name: str, known: list[str], where: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown {kind} '{name}'{where}. Known: {', '.join(sorted(known))}.{hint}"


def _check_type(loss: str, key: str, value: Any, default: Any) -> None:
    """A hyperparameter must have its default's kind: a number for a number (int or float; not a bool), a string
    for a string, a bool for a bool; ``clip_c`` (None: no dual clip) and ``norm_len`` (None: the generation budget)
    also take None."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif number(default) or default is None:
        ok = number(value) or (value is None and key in ("clip_c", "norm_len"))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        want = "true or false" if isinstance(default, bool) else "a number" if number(default) or default is None \
            else f"a {type(default).__name__}"
        raise ValueError(f"hyperparameter {key}={value!r} of loss '{loss}' must be {want} (default {default!r}).")


def build_loss(name: str, **overrides: Any) -> PolicyLoss:
    """The loss ``name`` with its defaults, overridden by keyword. Unknown names and keys raise."""
    if name not in LOSSES:
        raise ValueError(_unknown("loss", name, list(LOSSES)))
    spec = LOSSES[name]
    known = {**spec.defaults, **correction.CORRECTION_DEFAULTS}
    bad = [k for k in overrides if k not in known]
    if bad:
        raise ValueError(_unknown(f"hyperparameter of loss '{name}'", bad[0], list(known)))
    for key, value in overrides.items():
        _check_type(name, key, value, known[key])
    hp = {**known, **overrides}
    correction.check(hp, name, spec.rollout_is)
    return PolicyLoss(name, hp, spec)
