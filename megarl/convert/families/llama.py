"""Llama (LlamaForCausalLM): GQA attention without biases, SwiGLU MLP, RMSNorm. SmolLM2 is a Llama."""

from megarl.convert.families.rules import LLAMA_RULES

KEY_MAP = LLAMA_RULES
