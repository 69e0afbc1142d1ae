"""The conversion jobs: HF -> Megatron torch_dist, Megatron -> HF safetensors, and a logit probe between them.

hf-to-mcore   one process; builds the TP1/PP1 model in the checkpoint's own dtype without random init, fills it
              tensor by tensor from the safetensors files, saves torch_dist (loadable at any TP/PP).
mcore-to-hf   one process; loads the checkpoint at TP1/PP1 and streams HF tensors into size-capped shards.
verify        under torchrun with tp x pp (x dp, ep dividing dp) ranks; loads the checkpoint at that layout and compares its logits on
              a fixed prompt with HF transformers running the HF checkpoint.
Peak memory: one copy of the weights (the model) plus one shard or tensor in flight.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from megarl.backends.megatron.checkpoint import load_model, read_meta, save_model, write_meta
from megarl.backends.megatron.export import export_hf_weights
from megarl.backends.megatron.forward import forward_backward, gather_logits
from megarl.backends.megatron.model import build_model
from megarl.backends.megatron.parallel import ParallelDims, model_parallel
from megarl.backends.megatron.weights import load_hf_weights
from megarl.convert.arch import check_parallel, read_arch_dir
from megarl.convert.hf_io import HFReader, ShardedWriter, atomic_output_dir, check_output_dir, copy_side_files
from megarl.distributed import distributed
from megarl.checksums import write_checksums

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Knights always tell the truth and knaves always lie."


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its finished children (the checkpoint writers), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def checkpoint_dtype(reader: HFReader) -> torch.dtype:
    dtypes = reader.dtypes()
    if len(dtypes) != 1:
        raise ValueError(f"{reader.dir}: tensors have mixed dtypes {sorted(map(str, dtypes))}; megarl converts "
                         f"single-dtype checkpoints (re-save it with one torch_dtype).")
    return dtypes.pop()


def _derived(names, tied: bool) -> set[str]:
    """HF tensors that carry nothing to convert: rotary frequency buffers some exporters save, and the output
    layer of a model with tied embeddings (saved by some, equal to the embedding)."""
    return {n for n in names if n.endswith("rotary_emb.inv_freq") or (tied and n == "lm_head.weight")}


def hf_to_mcore(hf_dir: str, out_dir: str, overwrite: bool = False, log=print) -> dict:
    t0 = time.perf_counter()
    check_output_dir(Path(out_dir), overwrite)
    arch = read_arch_dir(hf_dir)
    reader = HFReader(hf_dir)
    dtype = checkpoint_dtype(reader)
    with distributed(), model_parallel(ParallelDims(1, 1)), atomic_output_dir(out_dir, overwrite) as tmp:
        model = build_model(arch, dtype=dtype, init_weights=False)
        unused = sorted(set(reader.names()) - load_hf_weights(model, arch, reader.get)
                        - _derived(reader.names(), arch.tie_embeddings))
        if unused:  # the config does not describe them: a different architecture, or a config that lost a key
            raise ValueError(f"{hf_dir}: {len(unused)} tensor(s) that config.json does not describe, e.g. "
                             f"{', '.join(unused[:3])}; converting would silently drop them. Check that config.json "
                             f"belongs to these weights.")
        reader.close()  # unmap the last shard before the checkpoint writer needs memory
        log(f"loaded {len(reader.names())} HF tensors ({arch.family}, {dtype}) in {time.perf_counter() - t0:.1f}s")
        (tmp / "hf").mkdir()
        copy_side_files(Path(hf_dir), tmp / "hf")
        write_meta(tmp, arch, dtype, str(Path(hf_dir).resolve()))
        (tmp / "model").mkdir()
        save_model(model, tmp / "model")
        write_checksums(tmp)
    stats = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": round(peak_rss_mib(), 1)}
    log(f"wrote {out_dir} (torch_dist, loadable at any TP/PP) in {stats['seconds']}s, peak RSS {stats['peak_rss_mib']} MiB")
    return stats


def mcore_to_hf(mcore_dir: str, out_dir: str, overwrite: bool = False, max_shard_bytes: int = 2 << 30,
                log=print) -> dict:
    t0 = time.perf_counter()
    check_output_dir(Path(out_dir), overwrite)
    arch, dtype, ckpt = read_meta(mcore_dir)
    with distributed(), model_parallel(ParallelDims(1, 1)), atomic_output_dir(out_dir, overwrite) as tmp:
        model = build_model(arch, dtype=dtype, init_weights=False)
        load_model(model, ckpt)
        writer = ShardedWriter(tmp, max_shard_bytes)
        for bucket in export_hf_weights(model, arch, bucket_bytes=64 << 20):
            for name, tensor in bucket:
                writer.add(name, tensor)
        writer.close()
        copy_side_files(Path(mcore_dir) / "hf", tmp)
    stats = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": round(peak_rss_mib(), 1),
             "shards": len(writer.files)}
    log(f"wrote {out_dir} ({len(writer.files)} safetensors shard(s) + index) in {stats['seconds']}s, "
        f"peak RSS {stats['peak_rss_mib']} MiB")
    return stats


def probe_ids(hf_dir: str, vocab_size: int) -> torch.Tensor:
    """The fixed probe prompt as ids [1, n]: tokenized when the directory has a working tokenizer, else a fixed
    id ramp (tiny test models ship no tokenizer)."""
    ids: list[int] = []
    if (Path(hf_dir) / "tokenizer.json").is_file() or (Path(hf_dir) / "tokenizer.model").is_file():
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(hf_dir)(PROBE_TEXT)["input_ids"]
    if len(ids) < 8 or max(ids) >= vocab_size:
        ids = [(17 * i + 3) % vocab_size for i in range(24)]
    return torch.tensor([ids], dtype=torch.long)


def verify(hf_dir: str, mcore_dir: str, tp: int = 1, pp: int = 1, tol: float = 1e-4, log=print, ep: int = 1) -> float:
    """Max |logit difference| between the Megatron checkpoint at TP x PP (x EP) and HF; raises above ``tol``."""
    with distributed():
        return verify_in_group(hf_dir, mcore_dir, tp, pp, tol, log, ep)


def verify_in_group(hf_dir: str, mcore_dir: str, tp: int, pp: int, tol: float, log=print, ep: int = 1) -> float:
    """``verify`` inside an existing process group (several checkpoints in one torchrun job)."""
    from transformers import AutoModelForCausalLM

    arch, _, ckpt = read_meta(mcore_dir)
    if read_arch_dir(hf_dir) != arch:
        raise ValueError(f"{hf_dir} and {mcore_dir} describe different architectures.")
    world = torch.distributed.get_world_size()
    check_parallel(arch, tp, pp, world, ep=ep)
    with model_parallel(ParallelDims(tp, pp, ep=ep)):
        model = build_model(arch, dtype=torch.float32, init_weights=False)
        load_model(model, ckpt)
        model.eval()
        ids = probe_ids(hf_dir, arch.vocab_size)
        out = forward_backward(model, [{"input_ids": ids}], lambda o, mb: gather_logits(o, arch.vocab_size),
                               forward_only=True)
        diff = torch.tensor([0.0], dtype=torch.float64)
        if out:
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                diff[0] = (out[0] - hf(ids).logits).abs().max().item()
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    result = float(diff[0])
    if torch.distributed.get_rank() == 0:
        log(f"verify tp={tp} pp={pp}{f' ep={ep}' if ep > 1 else ''}: {ids.shape[1]} probe tokens, max |logit diff| vs HF = {result:.3g} "
            f"(tolerance {tol:g})")
    if not result <= tol:
        raise ValueError(f"max |logit diff| {result:.3g} exceeds the tolerance {tol:g}: the checkpoints disagree.")
    return result
