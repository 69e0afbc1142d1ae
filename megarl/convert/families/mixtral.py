"""Mixtral (MixtralForCausalLM): Mistral's attention, every MLP a mixture of experts stored per expert
(``block_sparse_moe.experts.{e}.w1`` gate, ``w3`` up, ``w2`` down) with the router at ``block_sparse_moe.gate``."""

from megarl.convert.families.rules import moe_rules

KEY_MAP = moe_rules("model.layers.{i}.block_sparse_moe", "gate", "w1", "w3", "w2")
