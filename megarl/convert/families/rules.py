"""The rule type of the key maps, and the Llama-style rules every supported family shares."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensor(s) it comes from. ``{i}`` stands for the GLOBAL layer index, ``{e}``
    in a Megatron name for the expert's index on this rank and in an HF name for its GLOBAL index (experts are
    split over the expert-parallel ranks in contiguous blocks).

    Megatron names are those of the local layer spec; ``megarl.backends.megatron.weights`` translates the few
    that differ under the Transformer Engine spec (layer norms fused into the following linear).
    """

    mcore: str
    hf: tuple[str, ...]
    kind: str  # see megarl.convert.shard.KINDS

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.mcore


ATTN, MLP = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
LAYER = "decoder.layers.{i}"

LLAMA_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule(f"{LAYER}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), "replicated"),
    Rule(f"{LAYER}.self_attention.linear_qkv.weight",
         (f"{ATTN}.q_proj.weight", f"{ATTN}.k_proj.weight", f"{ATTN}.v_proj.weight"), "qkv"),
    Rule(f"{LAYER}.self_attention.linear_proj.weight", (f"{ATTN}.o_proj.weight",), "row"),
    Rule(f"{LAYER}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",), "replicated"),
    Rule(f"{LAYER}.mlp.linear_fc1.weight", (f"{MLP}.gate_proj.weight", f"{MLP}.up_proj.weight"), "gate_up"),
    Rule(f"{LAYER}.mlp.linear_fc2.weight", (f"{MLP}.down_proj.weight",), "row"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
)


EXPERT = f"{LAYER}.mlp.experts.local_experts.{{e}}"


def moe_rules(hf_moe: str, router: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Llama's attention and norms with a mixture-of-experts MLP: the router ([experts, hidden], replicated over
    TP) and each expert's SwiGLU MLP, laid out as a dense layer's (gate_up / row, split over expert-TP ranks).
    ``hf_moe`` is the HF module of the MoE block, the other names its submodules."""
    expert = f"{hf_moe}.experts.{{e}}"
    dense = tuple(r for r in LLAMA_RULES if ".mlp." not in r.mcore)
    return dense + (
        Rule(f"{LAYER}.mlp.router.weight", (f"{hf_moe}.{router}.weight",), "replicated"),
        Rule(f"{EXPERT}.linear_fc1.weight", (f"{expert}.{gate}.weight", f"{expert}.{up}.weight"), "gate_up"),
        Rule(f"{EXPERT}.linear_fc2.weight", (f"{expert}.{down}.weight",), "row"),
    )
