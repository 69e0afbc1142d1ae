"""Every YAML preset loads (unknown keys are refused), passes the cross-field validation at the world size it is
meant for, and holds only values that differ from the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megarl.config import RunConfig, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = {  # GPUs of the paper's run (configs/papers) or CPU ranks
    "tiny.yaml": 1,
    "trpa_kk_qwen2.5_7b.yaml": 4,
    "astar_po_gsm8k_qwen2.5_1.5b.yaml": 4,
    "astar_po_math_qwen2.5_1.5b.yaml": 4,
    "rpg_dapo_math_qwen2.5_7b.yaml": 8,
    "dapo_math_qwen2.5_7b.yaml": 8,
    "trw_grpo_gsm8k_qwen3_0.6b.yaml": 1,
}
PRESETS = sorted(REPO.glob("configs/**/*.yaml"))


def test_every_preset_is_listed():
    assert sorted(p.name for p in PRESETS) == sorted(WORLD_SIZE)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads_validates_and_only_changes_defaults(path):
    cfg = load_config(str(path))
    cfg.validate(WORLD_SIZE[path.name])
    defaults = to_dict(RunConfig())
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in values.items():
            loaded = to_dict(cfg)[section][key]
            assert loaded != defaults[section][key], f"{path.name}: {section}.{key} repeats the default {loaded!r}"
