"""Architecture parsing, layout checks and TP shard ops, against hand-built layouts and brute-force loops."""

from __future__ import annotations

import itertools

import pytest
import torch

from megarl.convert import shard as sh
from megarl.convert.arch import ModelArch, UnsupportedModel, check_parallel, read_arch, read_arch_dir
from megarl.convert.families import key_map
from megarl.convert.tiny import TINY_FAMILIES, tiny_hf_config, tiny_hf_model


def arch_of(family):
    return read_arch(tiny_hf_config(family).to_dict())


def test_read_arch_of_every_family():
    a = {f: arch_of(f) for f in TINY_FAMILIES}
    assert a["llama"].family == "llama" and not a["llama"].qkv_bias and not a["llama"].tie_embeddings
    assert a["qwen2"].qkv_bias and a["qwen2"].tie_embeddings and a["qwen2"].rope_theta == 1e6
    assert not a["qwen2_untied"].tie_embeddings
    assert a["qwen3"].qk_norm and a["qwen3"].head_dim == 16
    assert a["mistral"].family == "mistral"
    for x in a.values():
        assert (x.num_heads, x.num_kv_heads, x.num_layers, x.vocab_size, x.padded_vocab_size) == (4, 2, 4, 300, 384)


def test_transformers4_style_config_and_llama3_scaling():
    cfg = tiny_hf_config("llama").to_dict()
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}
    a = read_arch(cfg)
    assert a.rope_theta == 500000.0 and a.rope_scaling_factor == 32.0
    cfg["rope_scaling"]["high_freq_factor"] = 2.0
    with pytest.raises(UnsupportedModel, match="high_freq_factor"):
        read_arch(cfg)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UnsupportedModel, match="rope_type 'yarn' is not supported"):
        read_arch(cfg)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(UnsupportedModel) as e:
        read_arch_dir(tmp_path)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError, match="no such directory"):
        read_arch_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_arch_dir(tmp_path.parent)


def test_parallel_checks_name_the_key_and_valid_values():
    a = arch_of("llama")
    check_parallel(a, 2, 4, 8)
    with pytest.raises(ValueError, match=r"parallel\.tp=3 must divide num_attention_heads \(4\) and "
                                         r"num_key_value_heads \(2\); valid values: 1, 2\."):
        check_parallel(a, 3, 1)
    with pytest.raises(ValueError, match=r"parallel\.pp=3 must divide num_hidden_layers \(4\); valid values: 1, 2, 4"):
        check_parallel(a, 1, 3)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel\.tp x parallel\.pp = 2 x 2 = 4"):
        check_parallel(a, 2, 2, 6)


def qkv_by_loop(q, k, v, n_kv, g, d):
    """Megatron's layout built row by row: for each group, its g query heads, then its k head, then its v head."""
    rows = []
    for grp in range(n_kv):
        for h in range(g):
            rows += [q[(grp * g + h) * d + r] for r in range(d)]
        rows += [k[grp * d + r] for r in range(d)]
        rows += [v[grp * d + r] for r in range(d)]
    return torch.stack(rows)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_qkv_merge_matches_the_loop_layout_and_inverts(family):
    a = arch_of(family)
    q, k = torch.randn(a.num_heads * a.head_dim, 8), torch.randn(a.num_kv_heads * a.head_dim, 8)
    v = torch.randn_like(k)
    merged = sh.merge_qkv(q, k, v, a)
    assert torch.equal(merged, qkv_by_loop(q, k, v, a.num_kv_heads, a.heads_per_group, a.head_dim))
    assert all(torch.equal(x, y) for x, y in zip(sh.split_qkv(merged, a), (q, k, v)))
    bias = sh.merge_qkv(q[:, 0], k[:, 0], v[:, 0], a)
    assert torch.equal(bias, merged[:, 0])


@pytest.mark.parametrize("kind,tp", list(itertools.product(["replicated", "column", "row", "vocab", "qkv", "gate_up"],
                                                           [1, 2, 4])))
def test_shard_unshard_round_trip(kind, tp):
    full = torch.randn(32, 16)
    parts = [sh.shard(kind, full, tp, r) for r in range(tp)]
    assert torch.equal(sh.unshard(kind, parts), full)
    if kind == "gate_up" and tp > 1:  # rank r holds [gate_r; up_r], not a contiguous chunk
        gate, up = full[:16], full[16:]
        assert torch.equal(parts[1], torch.cat([gate.chunk(tp)[1], up.chunk(tp)[1]]))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_key_map_covers_every_hf_tensor_bit_exactly(family, tmp_path):
    """HF -> full Megatron tensors -> TP2 shards -> unshard -> HF reproduces every tensor, bit for bit. The HF
    tensors are those transformers writes to disk (MoE experts one by one; in memory transformers 5 fuses them)."""
    from safetensors.torch import load_file

    model = tiny_hf_model(family)
    model.save_pretrained(tmp_path)
    a = read_arch(model.config.to_dict())
    sd = {k: v for k, v in load_file(tmp_path / "model.safetensors").items()
          if not (a.tie_embeddings and k == "lm_head.weight")}
    seen = {}
    for rule in key_map(a):
        for i, e in itertools.product(range(a.num_layers) if rule.per_layer else [None],
                                      range(a.num_experts) if rule.per_expert else [None]):
            names = [n.replace("{i}", str(i)).replace("{e}", str(e)) for n in rule.hf]
            full = sh.to_mcore_full(rule.kind, tuple(sd[n] for n in names), a)
            back = sh.to_hf(rule.kind, sh.unshard(rule.kind, [sh.shard(rule.kind, full, 2, r) for r in range(2)]), a)
            seen.update(zip(names, back))
    assert set(seen) == set(sd)
    for n, t in sd.items():
        assert seen[n].dtype == t.dtype and torch.equal(seen[n], t), n


def test_padded_vocab_rows_are_zero():
    a = arch_of("llama")
    emb = torch.randn(300, 64)
    full = sh.to_mcore_full("vocab", (emb,), a)
    assert full.shape == (384, 64) and torch.count_nonzero(full[300:]) == 0
    assert isinstance(a, ModelArch)


def test_reader_refuses_dtypes_it_does_not_convert(tmp_path):
    from safetensors.torch import save_file

    from megarl.convert.hf_io import HFReader

    save_file({"model.norm.weight": torch.ones(4), "q": torch.zeros(4, dtype=torch.int8)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'q' has dtype I8; megarl converts floating-point checkpoints"):
        HFReader(tmp_path).dtypes()
    save_file({"model.norm.weight": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    assert HFReader(tmp_path).dtypes() == {torch.bfloat16}
