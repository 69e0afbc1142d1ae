"""Log-prob/entropy kernels: time and peak memory of forward+backward, naive vs fused paths.

    .venv/bin/python bench/logprob_kernels.py --tokens 4096                  # CPU: fp32, writes bench/results/cpu/
    python bench/logprob_kernels.py --tokens 4096 16384 65536 --dtype bf16   # CUDA: also the triton kernel

Paths (V = 151,936, Qwen2.5's vocabulary; H = 3584, Qwen2.5-7B's hidden size):
    naive          logits = hidden @ W^T, then the plain-torch reference (fp32 softmax over [T, V]), autograd
    fused_linear   megarl.kernels.chunked: the output projection fused in, chunked over tokens
    triton         megarl.kernels.triton_logprobs on the logits (CUDA only; the CPU interpreter is not a benchmark)
Loss: sum(logp) + 0.1 * sum(entropy), so both outputs and their gradients are exercised.

Memory: on CUDA, torch.cuda.max_memory_allocated above the inputs; on CPU, the subprocess's peak RSS minus its RSS
once the inputs exist (both count the weight gradient, which every path produces). Each (path, T) runs in a fresh
subprocess. Results go to bench/results/<device>/logprob_kernels.json with the commit and command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
V, H = 151_936, 3584


def one_run(path: str, tokens: int, dtype_name: str, device: str) -> dict:
    import resource

    import torch

    from megarl.kernels import token_logprobs_entropy
    from megarl.kernels.reference import logprob_entropy_reference

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    hidden = (torch.randn(tokens, H, device=device) * 0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, device=device) * 0.02).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (tokens,), device=device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil

        base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if path == "naive":
        lp, ent = logprob_entropy_reference(hidden @ weight.t(), targets)
    elif path == "fused_linear":
        lp, ent = token_logprobs_entropy(hidden=hidden, weight=weight, targets=targets)
    else:
        logits = hidden @ weight.t()
        lp, ent = token_logprobs_entropy(logits=logits, targets=targets, impl="triton")
    (lp.sum() + 0.1 * ent.sum()).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"path": path, "tokens": tokens, "dtype": dtype_name, "seconds": round(seconds, 3),
            "peak_extra_mib": round(peak / 2**20, 1), "logp_sum": float(lp.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--paths", nargs="+", default=None)
    ap.add_argument("--one", nargs=3, metavar=("PATH", "TOKENS", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args.one[2], device)))
        return
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    paths = args.paths or (["naive", "fused_linear", "triton"] if device == "cuda" else ["naive", "fused_linear"])
    rows = []
    for tokens in args.tokens:
        for path in paths:
            r = subprocess.run([sys.executable, __file__, "--one", path, str(tokens), dtype], capture_output=True,
                               text=True, cwd=REPO)
            if r.returncode:
                rows.append({"path": path, "tokens": tokens, "dtype": dtype, "error": r.stderr.strip()[-500:]})
            else:
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for tokens in args.tokens:
        base = next((r for r in rows if r["tokens"] == tokens and r["path"] == "naive" and "error" not in r), None)
        for r in rows:
            if base and r["tokens"] == tokens and "error" not in r:
                r["memory_vs_naive"] = round(r["peak_extra_mib"] / base["peak_extra_mib"], 3)
                r["speedup_vs_naive"] = round(base["seconds"] / r["seconds"], 2)
    from results_io import write_result

    print(f"wrote {write_result('logprob_kernels', rows, sys.argv[1:], vocab=V, hidden=H)}")

if __name__ == "__main__":
    main()
