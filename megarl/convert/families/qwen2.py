"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama's tensors plus q/k/v biases, merged like the weights."""

from megarl.convert.families.rules import ATTN, LAYER, LLAMA_RULES, Rule

KEY_MAP = LLAMA_RULES + (
    Rule(f"{LAYER}.self_attention.linear_qkv.bias",
         (f"{ATTN}.q_proj.bias", f"{ATTN}.k_proj.bias", f"{ATTN}.v_proj.bias"), "qkv"),
)
