"""The model directories megarl writes for itself (tiny models, the bundled SmolLM2) are complete whatever
torch.distributed rank writes them: the first rank of every node builds them, and only one node holds global
rank 0. (transformers' save_pretrained writes nothing on other ranks; a two-node run once published a tiny-model
directory without weights that way.)"""

from __future__ import annotations

import torch

from megarl.convert.bundled import is_complete_hf_dir, resolve_model_spec


def test_tiny_model_written_by_a_rank_other_than_zero_is_complete(tmp_path, monkeypatch):
    import transformers.distributed.mixin as mixin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)  # node 1's first rank
    out = resolve_model_spec("tiny:qwen2", tmp_path, seed=3)
    assert is_complete_hf_dir(out)
    monkeypatch.undo()
    from transformers import AutoModelForCausalLM

    from megarl.convert.tiny import tiny_hf_model

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = tiny_hf_model("qwen2", seed=3, vocab_size=loaded.config.vocab_size, max_position_embeddings=2048)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
