"""A model's architecture read from a Hugging Face ``config.json``: plain data, no Megatron, no transformers.

Supported families (all pre-norm RMSNorm decoders with SwiGLU MLPs and RoPE):

    Llama   LlamaForCausalLM     GQA, optional tied embeddings, llama3 rope scaling
    Mistral MistralForCausalLM   as Llama; sliding window recorded (sequences must fit inside it)
    Qwen2   Qwen2ForCausalLM     q/k/v bias (Qwen2 and Qwen2.5), tied or untied embeddings
    Qwen3   Qwen3ForCausalLM     per-head RMSNorm on q and k (qk-norm), explicit head_dim
    Qwen3-MoE Qwen3MoeForCausalLM  Qwen3's attention; every MLP a mixture of experts (softmax router, top-k,
                                 renormalised when norm_topk_prob), no shared experts
    Mixtral MixtralForCausalLM   Mistral's attention; every MLP a mixture of experts (top-k, renormalised)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
               "mixtral": "mixtral"}
VOCAB_PAD_MULTIPLE = 128  # padded vocab is independent of TP, so checkpoints reshard between TP sizes


class UnsupportedModel(ValueError):
    """The checkpoint's architecture or one of its options cannot be built."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelArch:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling_factor: float | None = None  # llama3-style scaling (Llama 3.1+), None = off
    sliding_window: int | None = None
    # mixture of experts (0 experts: a dense model). The router takes softmax over all experts then the top k;
    # moe_norm_topk renormalises the k weights to sum to 1 (equal to a softmax over the top k logits)
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0  # each expert's intermediate size
    moe_norm_topk: bool = True
    moe_aux_loss_coef: float = 0.0  # the checkpoint's router_aux_loss_coef (the default of moe.aux_loss_coef)
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to a multiple of 128; rows past vocab_size are zero and masked out of softmaxes."""
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _rope(cfg: dict[str, Any]) -> tuple[float, float | None]:
    """(theta, llama3 factor) from either transformers-4 (rope_theta/rope_scaling) or -5 (rope_parameters)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        src = params if params.get("rope_type") == "llama3" else scaling
        # megatron-core hard-codes these three; anything else would silently diverge from HF
        expect = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in expect.items():
            if float(src.get(key, value)) != value:
                raise UnsupportedModel(f"rope scaling llama3 with {key}={src.get(key)} is not supported "
                                       f"(megatron-core implements only {key}={value}).")
        return float(theta), float(src.get("factor", 8.0))
    raise UnsupportedModel(f"rope_type '{kind}' is not supported; supported: default, llama3.")


def read_arch(cfg: dict[str, Any], source: str = "config.json") -> ModelArch:
    """Parse an HF config dict. Raises UnsupportedModel with one line naming what is wrong."""
    if not isinstance(cfg, dict):
        raise UnsupportedModel(f"{source}: a model config is a JSON object; this holds a {type(cfg).__name__}.")
    try:
        return _read_arch(cfg, source)
    except KeyError as e:
        raise UnsupportedModel(f"{source}: key {e.args[0]!r} is missing; a Hugging Face config.json of a "
                               f"supported model has it.") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, UnsupportedModel):
            raise
        raise UnsupportedModel(f"{source}: a size or rate has the wrong type ({e}).") from None


def _read_arch(cfg: dict[str, Any], source: str) -> ModelArch:
    archs = cfg.get("architectures") or []
    if archs:  # the class transformers would instantiate decides; model_type only when it is absent
        family = next((FAMILIES[a] for a in archs if a in FAMILIES), None)
    else:
        family = MODEL_TYPES.get(cfg.get("model_type", ""))
    if family is None:
        raise UnsupportedModel(f"{source}: architecture {archs or cfg.get('model_type')} is not supported. "
                               f"Supported: {', '.join(sorted(FAMILIES))}.")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"{source}: hidden_act='{act}' is not supported (SwiGLU with silu only).")
    if family in ("llama", "mistral") and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise UnsupportedModel(f"{source}: attention_bias/mlp_bias=True is not supported for {family}.")
    if family in ("qwen3", "qwen3_moe", "mixtral") and cfg.get("attention_bias"):
        raise UnsupportedModel(f"{source}: attention_bias=True is not supported for {family}.")
    heads = int(cfg["num_attention_heads"])
    theta, factor = _rope(cfg)
    window = cfg.get("sliding_window") if (family in ("mistral", "mixtral") or cfg.get("use_sliding_window")) else None
    return ModelArch(
        family=family, vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        ffn_hidden_size=int(cfg["intermediate_size"]), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling_factor=factor,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "qwen3_moe"), sliding_window=int(window) if window else None,
        **(_moe(cfg, family, source) if family in ("qwen3_moe", "mixtral") else {}), hf_config=dict(cfg))


def _moe(cfg: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    """The mixture-of-experts fields; layouts megarl cannot build are refused by name."""
    experts = int(cfg.get("num_experts") or cfg["num_local_experts"])
    top_k = int(cfg["num_experts_per_tok"])
    if not 1 <= top_k <= experts:
        raise UnsupportedModel(f"{source}: num_experts_per_tok={top_k} must be between 1 and the number of "
                               f"experts ({experts}).")
    if family == "qwen3_moe" and (cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1):
        raise UnsupportedModel(f"{source}: mlp_only_layers / decoder_sparse_step != 1 (dense layers between the "
                               f"MoE layers) is not supported; every layer must be a MoE layer.")
    if float(cfg.get("router_jitter_noise") or 0.0):
        raise UnsupportedModel(f"{source}: router_jitter_noise={cfg['router_jitter_noise']} is not supported "
                               f"(use 0.0, as the released Mixtral checkpoints do).")
    ffn = cfg.get("moe_intermediate_size") if family == "qwen3_moe" else cfg["intermediate_size"]
    # transformers' Qwen3MoeConfig defaults norm_topk_prob to False; Mixtral always renormalises
    norm = bool(cfg.get("norm_topk_prob", False)) if family == "qwen3_moe" else True
    if norm and top_k == 1:
        raise UnsupportedModel(f"{source}: top-1 routing with renormalised weights (every weight 1, so the router "
                               f"never learns) is refused by megatron-core; it needs a top-k of 2 or more.")
    return dict(num_experts=experts, moe_top_k=top_k, moe_ffn_hidden_size=int(ffn), moe_norm_topk=norm,
                moe_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0))


def stop_ids(tokenizer, arch: "ModelArch") -> tuple[int, ...]:
    """End-of-response token ids: the tokenizer's EOS and the model config's (they differ for some instruct models)."""
    ids = {tokenizer.eos_token_id, arch.hf_config.get("eos_token_id")}
    return tuple(sorted(t for t in ids if isinstance(t, int)))


def read_arch_dir(hf_dir: str | Path) -> ModelArch:
    """Read ``HF_DIR/config.json``; a missing directory or file is a one-line error."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such directory (expected a Hugging Face model directory).")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a Hugging Face model directory holds config.json.")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedModel(f"{path}: not valid JSON ({e}).") from None
    return read_arch(cfg, str(path))


def check_parallel(arch: ModelArch, tp: int, pp: int, world_size: int | None = None, ep: int = 1) -> None:
    """Validate TP/PP/EP against the model and the world size (``megarl.parallel.ParallelDims.check``, the one
    check the config, the converter and the Megatron backend share)."""
    from megarl.parallel import ParallelDims

    ParallelDims(tp, pp, ep=ep).check(world_size, arch)
