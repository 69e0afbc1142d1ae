"""Log-prob/entropy kernels: time, peak memory and bandwidth of forward+backward, naive vs fused paths.

    .venv/bin/python bench/logprob_kernels.py --tokens 4096                  # CPU: fp32, writes bench/results/cpu/
    python bench/logprob_kernels.py --tokens 4096 16384 65536                # CUDA: bf16, every path below

Paths (V = 151,936, Qwen2.5's vocabulary; H = 3584, Qwen2.5-7B's hidden size), from the hidden states, so the
output projection is included and the paths are comparable end to end:
    naive          logits = hidden @ W^T, then the plain-torch reference (fp32 softmax over [T, V]), autograd
    fused_linear   megarl.kernels.chunked: the output projection fused in, chunked over tokens (what the policy runs:
                   on CUDA each chunk through the Triton kernels, on CPU the torch steps)
    fused_linear_torch_chunks  the same with the torch steps per chunk on CUDA too (the CUDA path before 2026-12-04)
    triton         logits = hidden @ W^T, then megarl.kernels.triton_logprobs on them
On a given logits tensor [T, V] (the kernel alone; its bandwidth is reported):
    naive_logits   the plain-torch reference
    triton_logits  the Triton kernel: reads the logits twice (forward, backward) and writes their gradient once, so
                   it moves at least 3 x T x V x bytes-per-element; GB/s = that / seconds
    te_logits      Transformer Engine's parallel cross entropy (log-probs only), when TE imports
    triton_logits@BxW  the same kernel launched with B-column vocabulary tiles and W warps per program (--triton-launch;
                   on CUDA by default 4096x16, 16384x16 and 32768x32 beside the default 4096 x Triton's 4): which
                   launch comes nearest the bandwidth limit is measured, not guessed
The triton paths run on CUDA only (the CPU interpreter is not a benchmark). On CUDA a path that fails (out of
memory, a launch that does not compile) is recorded with its error and the others still run.
Loss: sum(logp) + 0.1 * sum(entropy), so both outputs and their gradients are exercised.

Timing: on CUDA one warm-up (Triton compiles, the allocator settles), then the median of --reps timed runs; on
CPU one run (each takes a minute). Memory: on CUDA, torch.cuda.max_memory_allocated above the inputs during a
timed run; on CPU, the subprocess's peak RSS minus its RSS once the inputs exist (both count the weight gradient,
which every hidden-state path produces). Each (path, T) runs in a fresh subprocess on CPU; on CUDA in this process
(a path that runs out of memory is recorded as such). The physical limit: the device's copy bandwidth, measured
here (bytes read + written by a device-to-device copy of 2 GiB), not a datasheet figure.
Results go to bench/results/<device>/logprob_kernels.json with the commit and command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
V, H = 151_936, 3584
FROM_HIDDEN = ("naive", "fused_linear", "fused_linear_torch_chunks", "triton")
FROM_LOGITS = ("naive_logits", "triton_logits", "te_logits")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
CUDA_LAUNCHES = ("4096x16", "16384x16", "32768x32")


def launch_of(path: str) -> tuple[str, dict]:
    """'triton_logits@16384x16' -> ('triton_logits', {'block': 16384, 'num_warps': 16}); other paths unchanged."""
    base, _, launch = path.partition("@")
    if not launch:
        return base, {}
    block, warps = (int(v) for v in launch.split("x"))
    return base, {"block": block, "num_warps": warps}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float:
    """Measured bytes/s of a device-to-device copy, counting the bytes read and the bytes written."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times[1:])


def one_run(path: str, tokens: int, dtype_name: str, device: str, reps: int, vocab: int, hidden_size: int) -> dict:
    """Time and peak memory of one path's forward+backward at ``tokens`` tokens."""
    import resource

    import torch

    from megarl.kernels import token_logprobs_entropy
    from megarl.kernels.chunked import logprob_entropy_fused_linear
    from megarl.kernels.reference import logprob_entropy_reference
    from megarl.kernels.triton_logprobs import logprob_entropy_triton

    dtype = getattr(torch, DTYPES[dtype_name])
    torch.manual_seed(0)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    base_path, launch = launch_of(path)
    from_logits = base_path in FROM_LOGITS
    if from_logits:
        logits = (torch.randn(tokens, vocab, device=device) * 2).to(dtype).requires_grad_(True)
    else:
        hidden = (torch.randn(tokens, hidden_size, device=device) * 0.5).to(dtype).requires_grad_(True)
        weight = (torch.randn(vocab, hidden_size, device=device) * 0.02).to(dtype).requires_grad_(True)

    def run():
        if path == "naive":
            lp, ent = logprob_entropy_reference(hidden @ weight.t(), targets)
        elif path == "fused_linear":
            lp, ent = token_logprobs_entropy(hidden=hidden, weight=weight, targets=targets)
        elif path == "fused_linear_torch_chunks":
            lp, ent = logprob_entropy_fused_linear(hidden, weight, targets, chunk_kernel="torch")
        elif path == "triton":
            lp, ent = token_logprobs_entropy(logits=hidden @ weight.t(), targets=targets, impl="triton")
        elif path == "naive_logits":
            lp, ent = logprob_entropy_reference(logits, targets)
        elif launch:
            lp, ent = logprob_entropy_triton(logits, targets, **launch)
        else:
            lp, ent = token_logprobs_entropy(logits=logits, targets=targets, impl=path.removesuffix("_logits"))
        loss = lp.sum() + (0.1 * ent.sum() if path != "te_logits" else 0.0)  # TE has no entropy output
        loss.backward()
        return lp.detach().sum()

    cuda = device == "cuda"
    if cuda:
        run()  # warm-up: compiles Triton kernels, sizes the allocator's pools
        for t in ([logits] if from_logits else [hidden, weight]):
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil

        base = psutil.Process().memory_info().rss
    times = []
    for _ in range(reps if cuda else 1):
        _sync(device)
        t0 = time.perf_counter()
        logp_sum = run()
        _sync(device)
        times.append(time.perf_counter() - t0)
        logp_sum = float(logp_sum)
        for t in ([logits] if from_logits else [hidden, weight]):
            t.grad = None
    seconds = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    row = {"path": path, "tokens": tokens, "dtype": dtype_name, "seconds": round(seconds, 5),
           "peak_extra_mib": round(peak / 2**20, 1), "logp_sum": logp_sum}
    if from_logits:
        moved = 3 * tokens * vocab * torch.finfo(dtype).bits // 8
        row["gb_per_s"] = round(moved / seconds / 1e9, 1)
    return row


def _compare(rows: list[dict], peak_copy: float | None) -> None:
    """Speed-up and memory ratio against the naive row of the same kind and T; bandwidth against the copy peak."""
    for r in rows:
        if "error" in r:
            continue
        base_path = "naive_logits" if launch_of(r["path"])[0] in FROM_LOGITS else "naive"
        base = next((b for b in rows if b["tokens"] == r["tokens"] and b["path"] == base_path and "error" not in b),
                    None)
        if base:
            r["speedup_vs_naive"] = round(base["seconds"] / r["seconds"], 2)
            r["memory_vs_naive"] = round(r["peak_extra_mib"] / base["peak_extra_mib"], 3) \
                if base["peak_extra_mib"] > 0 else None
        if peak_copy and "gb_per_s" in r:
            r["bandwidth_vs_peak"] = round(r["gb_per_s"] * 1e9 / peak_copy, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--paths", nargs="+", default=None, choices=FROM_HIDDEN + FROM_LOGITS)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per path on CUDA (median)")
    ap.add_argument("--triton-launch", nargs="*", default=None, metavar="BLOCKxWARPS",
                    help=f"extra launches of the Triton kernel on given logits; default on CUDA {' '.join(CUDA_LAUNCHES)}")
    ap.add_argument("--vocab", type=int, default=V, help=argparse.SUPPRESS)  # small shapes: checking the bench
    ap.add_argument("--hidden", type=int, default=H, help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, metavar=("PATH", "TOKENS", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one[0], int(args.one[1]), args.one[2], device, args.reps,
                                             args.vocab, args.hidden)), flush=True)
        return
    from results_io import run_one, write_result

    from megarl.kernels import te_available

    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    paths = args.paths or (list(FROM_HIDDEN + FROM_LOGITS[:2]) + (["te_logits"] if te_available() else [])
                           if device == "cuda" else ["naive", "fused_linear"])
    launches = args.triton_launch if args.triton_launch is not None else (CUDA_LAUNCHES if device == "cuda" else ())
    for launch in launches:  # a malformed one fails here, before anything runs
        try:
            launch_of("triton_logits@" + launch)
        except ValueError:
            ap.error(f"--triton-launch {launch!r}: expected BLOCKxWARPS, e.g. 16384x16")
    paths = paths + [f"triton_logits@{launch}" for launch in launches]
    rows, extra = [], {"vocab": args.vocab, "hidden": args.hidden}
    for tokens in args.tokens:
        for path in paths:
            label = {"path": path, "tokens": tokens, "dtype": dtype}
            if device == "cuda":
                try:
                    rows.append(one_run(path, tokens, dtype, device, args.reps, args.vocab, args.hidden))
                except torch.cuda.OutOfMemoryError:
                    rows.append({**label, "error": "out of memory"})
                except Exception as e:  # one path's failure (e.g. a launch that does not compile) ends only its row
                    rows.append({**label, "error": f"{type(e).__name__}: {e}"[:2000]})
                torch.cuda.empty_cache()
            else:
                rows.append(run_one([sys.executable, __file__, "--one", path, str(tokens), dtype, "--vocab",
                                     str(args.vocab), "--hidden", str(args.hidden)], label))
            print(json.dumps(rows[-1]), flush=True)
            _compare(rows, None)
            write_result("logprob_kernels", rows, sys.argv[1:], complete=False, **extra)
    peak_copy = copy_bandwidth(device) if any(launch_of(p)[0] in FROM_LOGITS for p in paths) else None
    _compare(rows, peak_copy)
    if peak_copy:
        extra["copy_gb_per_s"] = round(peak_copy / 1e9, 1)
    print(f"wrote {write_result('logprob_kernels', rows, sys.argv[1:], **extra)}")


if __name__ == "__main__":
    main()
