"""Qwen3 (Qwen3ForCausalLM): Llama's tensors plus per-head RMSNorm weights on q and k (replicated)."""

from megarl.convert.families.rules import ATTN, LAYER, LLAMA_RULES, Rule

KEY_MAP = LLAMA_RULES + (
    Rule(f"{LAYER}.self_attention.q_layernorm.weight", (f"{ATTN}.q_norm.weight",), "replicated"),
    Rule(f"{LAYER}.self_attention.k_layernorm.weight", (f"{ATTN}.k_norm.weight",), "replicated"),
)
