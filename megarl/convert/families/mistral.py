"""Mistral (MistralForCausalLM): tensor names and layouts identical to Llama's."""

from megarl.convert.families.rules import LLAMA_RULES

KEY_MAP = LLAMA_RULES
