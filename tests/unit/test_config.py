"""Config loading: defaults, YAML presets, typed dotted overrides, unknown keys with suggestions, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from megarl.config import RunConfig, load_config, save_config, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_preset_and_overrides_layer_in_order(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.steps=8", "rollout.temperature=0.7", "parallel.tp=2",
                                              "model.hf_dir=none", "algo.loss_hparams={clip_high: 0.3}"])
    assert cfg.train.steps == 8 and cfg.rollout.group_size == 4 and cfg.run.dir == "runs/tiny"
    assert cfg.rollout.temperature == 0.7 and cfg.parallel.tp == 2 and cfg.model.hf_dir is None
    assert cfg.algo.loss_hparams == {"clip_high": 0.3} and cfg.optim.weight_decay == RunConfig().optim.weight_decay
    save_config(cfg, tmp_path / "config.yaml")  # the resolved tree round-trips through YAML
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("override,message", [
    ("train.stpes=3", r"unknown config key 'train.stpes'. Did you mean 'train.steps'\?"),
    ("trian.steps=3", r"unknown config key 'trian.steps'. Did you mean 'train.steps'\?"),
    ("train.steps=2.5", r"train.steps='2.5' is not a valid int"),
    ("model.dtype=fp8", r"model.dtype='fp8' is not one of 'float32', 'bfloat16'"),
    ("steps", r"override 'steps' is not key=value"),
])
def test_bad_overrides_name_the_key_and_fix(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_every_preset_loads_and_validates():
    presets = sorted(CONFIGS.glob("*.yaml"))
    assert presets
    for p in presets:
        load_config(p, world_size=1)


def test_cross_section_validation(tmp_path):
    with pytest.raises(ValueError, match=r"rollout.group_size=1 leaves nothing to compare against"):
        load_config(None, ["rollout.group_size=1"], world_size=1)
    load_config(None, ["rollout.group_size=1", "algo.loss=astar_po"], world_size=1)  # A*-PO: one sample
    with pytest.raises(ValueError, match=r"train.prompts_per_step \(6\) must be divisible by data-parallel size "
                                         r"\(4\) x train.minibatches_per_step \(1\) = 4"):
        load_config(None, ["train.prompts_per_step=6"], world_size=4)
    with pytest.raises(ValueError, match=r"kernels.impl='te' gives log-probs only.*'astar_po' reads the entropy"):
        load_config(None, ["kernels.impl=te", "algo.loss=astar_po", "rollout.group_size=1"], world_size=1)
    load_config(None, ["kernels.impl=te"], world_size=1)  # GRPO: no entropy term by default
    with pytest.raises(ValueError, match=r"kernels.impl='cuda' is not one of 'auto', 'fused_linear'"):
        load_config(None, ["kernels.impl=cuda"], world_size=1)
    with pytest.raises(ValueError, match=r"Unknown loss 'dapo2'.*Did you mean 'dapo'"):
        load_config(None, ["algo.loss=dapo2"], world_size=1)
    with pytest.raises(ValueError, match=r"clip_hihg"):
        load_config(None, ["algo.loss_hparams={clip_hihg: 0.3}"], world_size=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  lr: 1.0\n")
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer'. Did you mean 'optim'\?"):
        load_config(bad)
