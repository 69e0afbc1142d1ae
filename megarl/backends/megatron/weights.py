"""Load Hugging Face weights into this rank's Megatron shard, and gather shards back into HF tensors.

Both directions walk the family key map (``megarl.convert.families``) and the tensor ops of
``megarl.convert.shard``; they hold one full tensor at a time. Expert weights of mixture-of-experts layers are
split over the expert-TP group (as dense MLPs over TP) and, expert by expert, over the expert-parallel group:
EP rank r holds global experts r x E/ep ... (r + 1) x E/ep - 1 as its local experts 0 ... E/ep - 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megarl.backends.megatron.model import unwrap
from megarl.convert import shard as sh
from megarl.convert.arch import ModelArch
from megarl.convert.families import key_map
from megarl.convert.families.rules import Rule

# Under the Transformer Engine spec the pre-attention / pre-MLP norms are fused into the next linear layer.
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_GROUPED = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")  # TE's grouped GEMM: one tensor per expert


def _expert_layout(arch: ModelArch) -> tuple[int, int]:
    """(experts per EP rank, this rank's first global expert); (0, 0) for a dense model."""
    if not arch.is_moe:
        return 0, 0
    local = arch.num_experts // parallel_state.get_expert_model_parallel_world_size()
    return local, parallel_state.get_expert_model_parallel_rank() * local


def _local_layers(model) -> dict[int, int]:
    """local layer index -> global layer index on this pipeline stage."""
    gpt = unwrap(model)
    return {j: layer.layer_number - 1 for j, layer in enumerate(gpt.decoder.layers)}


def _rule_for(name: str, rules: tuple[Rule, ...], layers: dict[int, int],
              tied: bool) -> tuple[Rule, int | None, int | None]:
    """(rule, global layer, LOCAL expert index) of a Megatron parameter name."""
    m = _LAYER.match(name)
    if m:
        local, suffix, expert = int(m.group(1)), m.group(2), None
        for te_suffix_from, te_suffix_to in TE_NAMES.items():
            if suffix == te_suffix_to:
                suffix = te_suffix_from
        if g := _GROUPED.match(suffix):
            suffix = f"mlp.experts.local_experts.{g.group(2)}.{g.group(1)}.weight"
        if e := _EXPERT.match(suffix):
            expert, suffix = int(e.group(1)), f"mlp.experts.local_experts.{{e}}.{e.group(2)}"
        for r in rules:
            if r.per_layer and r.mcore == f"decoder.layers.{{i}}.{suffix}":
                return r, layers[local], expert
    else:
        for r in rules:
            if r.mcore == name:
                return r, None, None
        if name == "output_layer.weight" and tied:  # last PP stage's copy of the tied embedding
            return Rule(name, ("model.embed_tokens.weight",), "vocab"), None, None
    raise KeyError(f"no HF tensor maps to Megatron parameter '{name}'")


def _hf_names(rule: Rule, layer: int | None, expert: int | None) -> tuple[str, ...]:
    return tuple(n.replace("{i}", str(layer)).replace("{e}", str(expert)) for n in rule.hf)


def _tp_of(rule: Rule) -> tuple[int, int]:
    """(size, rank) of the tensor-parallel group that splits this rule's tensor (expert-TP for expert weights)."""
    if rule.per_expert:
        return (parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_rank())
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def load_hf_weights(model: torch.nn.Module, arch: ModelArch, get_hf: Callable[[str], torch.Tensor]) -> set[str]:
    """Copy HF tensors (``get_hf(name)``, e.g. a safetensors handle) into this rank's parameters; returns the HF
    names read.

    Raises ValueError naming the tensor and both shapes when the checkpoint disagrees with the config, and naming
    the tensor that holds NaN or inf (a model that cannot train, found before any step).
    """
    rules, layers = key_map(arch), _local_layers(model)
    _, first_expert = _expert_layout(arch)
    used: set[str] = set()
    for name, param in unwrap(model).named_parameters():
        rule, layer, expert = _rule_for(name, rules, layers, arch.tie_embeddings)
        tp, rank = _tp_of(rule)
        hf_names = _hf_names(rule, layer, None if expert is None else first_expert + expert)
        hf = tuple(get_hf(n) for n in hf_names)
        _check_hf_shapes(rule, hf_names, hf, arch)
        for n, t in zip(hf_names, hf):
            if not torch.isfinite(t).all():
                raise ValueError(f"{n}: holds NaN or inf values; the checkpoint is damaged or was saved from a "
                                 f"diverged run.")
        used.update(hf_names)
        local = sh.shard(rule.kind, sh.to_mcore_full(rule.kind, hf, arch), tp, rank)
        if local.shape != param.shape:
            raise ValueError(f"{hf_names[0]}: gives Megatron '{name}' shape {tuple(local.shape)} on TP rank "
                             f"{rank}, but the model built from config.json expects {tuple(param.shape)}.")
        with torch.no_grad():
            param.copy_(local.to(param.dtype))
    return used


def expected_hf_shapes(rule: Rule, arch: ModelArch) -> tuple[tuple[int, ...], ...]:
    """The shape config.json implies for each HF tensor of a rule."""
    H, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    leaf = rule.mcore.rsplit(".", 2)[-2:]
    if rule.kind == "qkv":
        return ((q, H), (kv, H), (kv, H)) if leaf[-1] == "weight" else ((q,), (kv,), (kv,))
    ffn = arch.moe_ffn_hidden_size if rule.per_expert else arch.ffn_hidden_size
    if rule.kind == "gate_up":
        return ((ffn, H),) * 2
    if rule.kind == "vocab":
        return ((arch.vocab_size, H),)
    if leaf[0] == "linear_proj":
        return ((H, q),)
    if leaf[0] == "linear_fc2":
        return ((H, ffn),)
    if leaf[0] == "router":
        return ((arch.num_experts, H),)
    if leaf[0] in ("q_layernorm", "k_layernorm"):
        return ((d,),)
    return ((H,),)


def _check_hf_shapes(rule: Rule, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], arch: ModelArch):
    for n, t, want in zip(names, tensors, expected_hf_shapes(rule, arch)):
        if tuple(t.shape) != want:
            raise ValueError(f"tensor '{n}' has shape {tuple(t.shape)} but config.json implies {want}; the "
                             f"checkpoint and its config.json disagree.")


def _gather_tp(local: torch.Tensor, rule: Rule) -> torch.Tensor:
    tp, _ = _tp_of(rule)
    if tp == 1 or rule.kind == "replicated":
        return local
    group = (parallel_state.get_expert_tensor_parallel_group() if rule.per_expert
             else parallel_state.get_tensor_model_parallel_group())
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return sh.unshard(rule.kind, parts)


def _gather_experts(full: torch.Tensor, expert: int, per_rank: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(global expert, tensor) of local expert ``expert`` on every EP rank: one all-gather over the EP group."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep == 1:
        yield expert, full
        return
    parts = [torch.empty_like(full) for _ in range(ep)]
    dist.all_gather(parts, full.contiguous(), group=parallel_state.get_expert_model_parallel_group())
    for r, t in enumerate(parts):
        yield r * per_rank + expert, t


def export_stage_hf(model: torch.nn.Module, arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the parameters of THIS pipeline stage, gathered over TP.

    Every TP rank of the stage must iterate in step (it all-gathers), and with experts every EP rank (each
    expert tensor is gathered over the EP group, so every rank yields every expert). The last stage's copy of a
    tied embedding is skipped: the first stage exports ``model.embed_tokens.weight``.
    """
    rules, layers = key_map(arch), _local_layers(model)
    per_rank, _ = _expert_layout(arch)
    for name, param in unwrap(model).named_parameters():
        if name == "output_layer.weight" and arch.tie_embeddings:
            continue
        rule, layer, expert = _rule_for(name, rules, layers, arch.tie_embeddings)
        full = _gather_tp(param.detach(), rule)
        for glob, t in (_gather_experts(full, expert, per_rank) if rule.per_expert else [(None, full)]):
            yield from zip(_hf_names(rule, layer, glob), sh.to_hf(rule.kind, t, arch))
