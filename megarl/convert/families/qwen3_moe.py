"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention (qk-norm), every MLP a mixture of experts stored per expert
(``mlp.experts.{e}.gate_proj/up_proj/down_proj``) with the router at ``mlp.gate``; no shared experts."""

from megarl.convert.families.rules import ATTN, LAYER, Rule, moe_rules

KEY_MAP = moe_rules("model.layers.{i}.mlp", "gate", "gate_proj", "up_proj", "down_proj") + (
    Rule(f"{LAYER}.self_attention.q_layernorm.weight", (f"{ATTN}.q_norm.weight",), "replicated"),
    Rule(f"{LAYER}.self_attention.k_layernorm.weight", (f"{ATTN}.k_norm.weight",), "replicated"),
)
