"""One declarative HF <-> Megatron key map per model family. ``key_map(arch)`` picks the family's map."""

from __future__ import annotations

from megarl.convert.arch import ModelArch
from megarl.convert.families import llama, mistral, mixtral, qwen2, qwen3, qwen3_moe
from megarl.convert.families.rules import Rule

_MAPS = {"llama": llama.KEY_MAP, "mistral": mistral.KEY_MAP, "qwen2": qwen2.KEY_MAP, "qwen3": qwen3.KEY_MAP,
         "qwen3_moe": qwen3_moe.KEY_MAP, "mixtral": mixtral.KEY_MAP}


def key_map(arch: ModelArch) -> tuple[Rule, ...]:
    """The family's rules; tied models drop the separate lm_head rule (the embedding serves both)."""
    rules = _MAPS[arch.family]
    return tuple(r for r in rules if not (arch.tie_embeddings and r.mcore == "output_layer.weight"))
