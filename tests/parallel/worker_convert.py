"""torchrun worker: for each converted tiny model, verify logits at the launched layout and check that the
streaming export (every rank receives every HF tensor, bucketed) is bit-identical to the on-disk HF files.

    torchrun --nproc-per-node N tests/parallel/worker_convert.py --tp T --pp P [--ep E] --root DIR --families a,b
DIR/<family>/hf holds the source HF model and DIR/<family>/mcore its hf-to-mcore conversion.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--root", required=True)
    ap.add_argument("--families", required=True)
    ap.add_argument("--bucket-bytes", type=int, default=20_000)
    args = ap.parse_args()

    from megarl.backends.megatron.checkpoint import load_model, read_meta
    from megarl.backends.megatron.convert import verify_in_group
    from megarl.backends.megatron.export import export_hf_weights
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.convert.hf_io import HFReader
    from megarl.distributed import distributed

    with distributed() as info:
        for family in args.families.split(","):
            hf_dir, mcore_dir = Path(args.root, family, "hf"), Path(args.root, family, "mcore")
            verify_in_group(str(hf_dir), str(mcore_dir), args.tp, args.pp, tol=1e-5, ep=args.ep)
            arch, dtype, ckpt = read_meta(mcore_dir)
            reader = HFReader(hf_dir)
            with model_parallel(ParallelDims(args.tp, args.pp, ep=args.ep)):
                model = build_model(arch, dtype=dtype, init_weights=False)
                load_model(model, ckpt)
                seen = set()
                for bucket in export_hf_weights(model, arch, bucket_bytes=args.bucket_bytes):
                    size = sum(t.numel() * t.element_size() for _, t in bucket)
                    biggest = max(t.numel() * t.element_size() for _, t in bucket)
                    assert size < args.bucket_bytes + biggest, f"bucket of {size} bytes"
                    for name, t in bucket:
                        ref = reader.get(name)
                        assert t.dtype == ref.dtype and torch.equal(t, ref), f"{family}: {name} differs"
                        assert name not in seen, f"{family}: {name} exported twice"
                        seen.add(name)
                assert seen == set(reader.names()), f"{family}: exported {sorted(set(reader.names()) ^ seen)}"
            if info.is_main:
                print(f"[tp{args.tp} pp{args.pp} ep{args.ep}] {family}: verify + streaming export ok", flush=True)


if __name__ == "__main__":
    main()
