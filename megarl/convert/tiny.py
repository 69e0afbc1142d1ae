"""Tiny randomly initialised Hugging Face models of every supported family, built in-process (no download).

Used by tests (HF is the independent reference) and by tiny configs. Shapes are chosen to exercise the hard
cases: GQA (4 query heads, 2 KV groups), a vocabulary that is not a multiple of 128 (so the padded columns
land on the last TP rank), 4 layers (PP up to 4), tied and untied embeddings. The mixture-of-experts families
have 4 experts, top 2, and heads of 32 (vLLM's CPU attention takes head sizes of 32 and up).
"""

from __future__ import annotations

import torch

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen2_untied", "qwen3", "qwen3_moe", "mixtral")


def tiny_hf_config(family: str, vocab_size: int = 300, **overrides):
    """A transformers config object of the family (``qwen2_untied``: Qwen2 with a separate lm_head)."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  attention_dropout=0.0)
    if family == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
    elif family == "mistral":
        cfg = MistralConfig(**common, head_dim=16, tie_word_embeddings=False, sliding_window=None)
    elif family in ("qwen2", "qwen2_untied"):
        cfg = Qwen2Config(**common, tie_word_embeddings=family == "qwen2", rope_theta=1e6)
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    elif family in ("qwen3_moe", "mixtral"):
        moe = dict(common, hidden_size=128, head_dim=32, num_experts_per_tok=2, tie_word_embeddings=False,
                   router_aux_loss_coef=0.01)
        cfg = (Qwen3MoeConfig(**moe, moe_intermediate_size=64, num_experts=4, norm_topk_prob=True)
               if family == "qwen3_moe" else MixtralConfig(**dict(moe, intermediate_size=64), num_local_experts=4))
    else:
        raise ValueError(f"unknown tiny family '{family}'; known: {', '.join(TINY_FAMILIES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised fp32 transformers model; the same seed gives the same weights in every process.

    Norm weights are perturbed away from 1 and q/k/v biases away from 0, so that a wrong mapping of those
    tensors cannot go unnoticed.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(".gate.weight"):  # a decisive router: no near-ties in the top k between frameworks
                p.mul_(10.0)
    return model.eval()


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors a transformers model saves, under their checkpoint names. transformers 5 fuses some tensors in
    memory (MoE experts: ``experts.gate_up_proj``) and splits them back on save (``experts.{e}.gate_proj.weight``);
    this applies that same reversal (transformers' ``revert_weight_conversion``) without writing files."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.contiguous() for k, v in revert_weight_conversion(model, state).items()}
