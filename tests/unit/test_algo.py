"""A loss carries its own needs (megarl/losses/registry.py LossSpec), and megarl/algo.py reads them: the paper's
advantage estimator under algo.advantage=auto, the reference, the group size; nothing outside megarl/losses
tests a loss's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from megarl.algo import resolve
from megarl.config import load_config
from megarl.losses.registry import LOSSES

PKG = Path(__file__).resolve().parents[2] / "megarl"


def cfg_of(*overrides: str):
    return load_config(None, ["model.hf_dir=tiny:qwen2", *overrides], world_size=None)


@pytest.mark.parametrize("loss,advantage,reference", [
    ("grpo", "grpo", "fixed"),  # kl_coef 1e-3 by default
    ("dr_grpo", "dr_grpo", "fixed"),  # the std division dropped (arXiv 2503.20783)
    ("dapo", "grpo", "none"),  # no KL
    ("reinforce_pp", "reinforce_pp_baseline", "old"),  # as the RPG paper runs its baselines
    ("rpg_fkl", "rpg", "old"), ("rpg_rf_urkl_clip", "rpg", "old"),
    ("trw_triangular", "grpo", "none"), ("gspo", "grpo", "none"), ("cispo", "grpo", "none"),
    ("kl_cov", "grpo", "none"),
    ("trpa", None, "fixed"), ("astar_po", None, "fixed"),
])
def test_auto_picks_each_papers_estimator_and_reference(loss, advantage, reference):
    algo = resolve(cfg_of(f"algo.loss={loss}", "rollout.group_size=4"))
    assert (algo.advantage, algo.reference, algo.notes) == (advantage, reference, ())


def test_the_old_silent_default_is_gone():
    """Before: algo.loss=dr_grpo alone trained with GRPO's std-normalised advantages."""
    assert cfg_of("algo.loss=dr_grpo").algo.advantage == "auto"
    assert resolve(cfg_of("algo.loss=dr_grpo")).advantage == "dr_grpo"


def test_an_explicit_other_estimator_runs_and_is_said():
    algo = resolve(cfg_of("algo.loss=dr_grpo", "algo.advantage=grpo"))
    assert algo.advantage == "grpo" and "not loss 'dr_grpo''s own estimator (dr_grpo)" in algo.notes[0]
    assert "advantage grpo" in algo.describe()
    assert resolve(cfg_of("algo.loss=dr_grpo", "algo.advantage=dr_grpo")).notes == ()


@pytest.mark.parametrize("overrides,message", [
    (["algo.advantage=gpro"], "Did you mean 'grpo'"),
    (["algo.loss=trpa", "algo.advantage=grpo"], "reads no advantages"),
    (["algo.loss=trpa", "rollout.group_size=1"], "loss 'trpa' compares responses"),
    (["algo.loss=grpo", "rollout.group_size=1"], "algo.advantage='grpo' compares responses"),
    (["algo.loss=rpg_fkl", "algo.reference=none"], "regularises toward a reference (old)"),
    (["algo.loss=astar_po", "kernels.impl=te"], "reads the entropy"),  # its entropy bonus, 1e-3 by default
    (["algo.loss=grpo", "kernels.impl=te", "algo.loss_hparams={entropy_coef: 0.01}"], "reads the entropy"),
])
def test_combinations_that_cannot_run_are_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg_of(*overrides).validate(world_size=1)


@pytest.mark.parametrize("overrides", [
    ["algo.loss=astar_po", "rollout.group_size=1"],  # one sample per prompt (the paper)
    ["algo.loss=reinforce_pp", "algo.advantage=reinforce_pp", "rollout.group_size=1"],  # batch whitening only
    ["algo.loss=grpo", "algo.loss_hparams={kl_coef: 0}", "algo.reference=none"],
])
def test_combinations_that_can_run_validate(overrides):
    cfg_of(*overrides).validate(world_size=1)


def test_normalisers_and_stage1_come_from_the_entry():
    assert "pref_terms" in LOSSES["trpa"].normalisers and LOSSES["astar_po"].stage1 == "vstar"
    assert all(s.stage1 is None for n, s in LOSSES.items() if n != "astar_po")


def _name_tests(path: Path) -> list[str]:
    """Comparisons with a loss's name (``== "trpa"``, ``in ("trpa", ...)``, ``.startswith("rpg")``) in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        consts = []
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                consts += [c.value for c in ast.walk(side) if isinstance(c, ast.Constant)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith":
            consts += [c.value for a in node.args for c in ast.walk(a) if isinstance(c, ast.Constant)]
        found += [f"{path.name}:{node.lineno} {v!r}" for v in consts
                  if isinstance(v, str) and (v in LOSSES or v in ("rpg", "rpg_", "trw"))]
    return found


def test_no_layer_outside_the_losses_tests_a_loss_name():
    # advantages.py matches estimator names, some of which are spelled like losses (grpo, dr_grpo, rpg)
    offenders = [hit for f in sorted(PKG.rglob("*.py")) if "losses" not in f.parts and f.name != "advantages.py"
                 for hit in _name_tests(f)]
    assert not offenders, offenders


def test_truncated_sampling_with_correction_or_bypass_is_said_at_the_start():
    plain = resolve(cfg_of("rollout.top_p=0.9"))
    assert not any("renormalised" in n for n in plain.notes)
    for extra in ("algo.bypass_old_logprobs=true", "algo.loss_hparams={rollout_is: token}"):
        notes = resolve(cfg_of("rollout.top_k=20", extra)).notes
        assert any("truncated, renormalised distribution" in n for n in notes), notes
