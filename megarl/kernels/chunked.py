"""Fused output projection + log-prob/entropy, chunked over tokens: the [T, V] logits never exist.

Forward, for each chunk of C tokens: z = (h_c @ W_r^T) / temperature in fp32 ([C, V_r]), reduced to logp, entropy,
lse and E_p[z] per token; only those [T] vectors are kept. Backward recomputes each chunk's logits and applies

    d logp / d z_v = 1[v = target] - p_v          d H / d z_v = -p_v (z_v - E_p[z])

    dz = (g_logp (onehot - p) - g_H p (z - E_p[z])) / temperature
    grad_h_c = dz @ W_r   (summed over TP ranks: every rank's vocabulary shard contributes)
    grad_W_r += dz^T @ h_c

Peak extra memory is two [C, V_r] fp32 buffers, independent of T; by default C is chosen so that one buffer
holds about 32M values (128 MiB). The matmuls run in the weights' dtype (fp32 accumulation inside) and only the
chunk's logits are upcast: no fp32 copy of the [V_r, H] weight is made. grad_W sums T / C chunk products, so in
bf16 it is summed in an fp32 buffer ([V_r, H], returned rounded once to the weight's dtype): summed in bf16, its error
grew with the number of chunks (256 chunks: 1.8% relative, against bf16's own 0.17%; tests/unit/test_kernels.py).

On CUDA each chunk's softmax statistics and dz come from the Triton kernels of ``triton_logprobs.py`` instead
(``chunk_kernel``): they read the chunk's logits in the weights' dtype once per pass, where the torch steps above
make several fp32 passes over [C, V_r]. Measured on an H200 (bench/results/nvidia-h200/, V = 151,936, H = 3,584,
16k tokens, bf16): 0.19 s with the Triton chunks against 0.45 s with the torch steps (and 0.23 s for plain torch,
which holds 45 GiB where this holds 3.4). The two [C, V_r] buffers are then in the weights' dtype, so C doubles
at the same memory.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist

from megarl.kernels.reference import shard_columns
from megarl.kernels.tp import acc_dtype, all_reduce_max, tp_size


def _chunk_stats(h, w, targets, temperature, vocab_size, group):
    """(lse, E_p[z], z_target) of a chunk's tokens after TP reductions (no autograd)."""
    z = (h @ w.t()).to(acc_dtype(h.dtype)) / temperature  # [C, V_r]
    cols = shard_columns(z.shape[-1], group, z.device)
    valid = cols < vocab_size
    z = z.masked_fill(~valid, float("-inf"))
    m = all_reduce_max(z.max(-1).values, group)
    e = torch.exp(z - m[:, None])
    hit = cols[None, :] == targets[:, None]
    parts = torch.stack([e.sum(-1), (e * z.masked_fill(~valid, 0.0)).sum(-1),
                         torch.where(hit, z, torch.zeros_like(z)).sum(-1)])  # [3, C]
    if tp_size(group) > 1:
        dist.all_reduce(parts, group=group)
    s, ezs, zt = parts
    lse = m + torch.log(s)
    return lse, ezs / s, zt


def _torch_chunk_dz(h, weight, tgt, lse, ez, g_logp, g_ent, temperature, vocab_size, group):
    """dz of one chunk in the weights' dtype (the torch steps of the module docstring)."""
    z = (h @ weight.t()).to(acc_dtype(h.dtype)).div_(temperature)  # [C, V_r]; becomes dz in place
    cols = shard_columns(z.shape[-1], group, z.device)
    valid = cols < vocab_size
    p = torch.exp(z - lse[:, None]).masked_fill_(~valid, 0.0)
    # dz = g_logp * onehot - p * (g_logp + g_H * (z - E_p[z])), two [C, V_r] buffers in all
    z.sub_(ez[:, None]).mul_(g_ent[:, None]).add_(g_logp[:, None])
    dz = z.mul_(p).neg_()
    del p
    local = tgt - cols[0]
    mine = (local >= 0) & (local < dz.shape[1])
    rows = torch.arange(len(tgt), device=dz.device)[mine]
    dz[rows, local[mine]] += g_logp[mine]
    dz.masked_fill_(~valid, 0.0).div_(temperature)
    return dz.to(weight.dtype)


def _triton_chunk_stats(h, w, targets, temperature, vocab_size, group):
    from megarl.kernels.triton_logprobs import softmax_stats

    return softmax_stats(h @ w.t(), targets, temperature, vocab_size, group)


def _triton_chunk_dz(h, w, targets, lse, ez, g_logp, g_ent, temperature, vocab_size, group):
    from megarl.kernels.triton_logprobs import logits_grad

    return logits_grad(h @ w.t(), targets, lse, ez, g_logp, g_ent, temperature, vocab_size, group)


class FusedLinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, vocab_size, group, chunk, kernel):
        T = hidden.shape[0]
        logp = torch.empty(T, dtype=acc_dtype(hidden.dtype), device=hidden.device)
        ent = torch.empty_like(logp)
        lse_all, ez_all = torch.empty_like(logp), torch.empty_like(logp)
        stats = _triton_chunk_stats if kernel == "triton" else _chunk_stats
        with torch.no_grad():
            for a in range(0, T, chunk):
                lse, ez, zt = stats(hidden[a:a + chunk], weight, targets[a:a + chunk], temperature, vocab_size,
                                    group)
                logp[a:a + chunk], ent[a:a + chunk] = zt - lse, lse - ez
                lse_all[a:a + chunk], ez_all[a:a + chunk] = lse, ez
        ctx.save_for_backward(hidden, weight, targets, lse_all, ez_all)
        ctx.cfg = (temperature, vocab_size, group, chunk, kernel)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse_all, ez_all = ctx.saved_tensors
        temperature, vocab_size, group, chunk, kernel = ctx.cfg
        g_logp = torch.zeros_like(lse_all) if g_logp is None else g_logp.to(lse_all.dtype)
        g_ent = torch.zeros_like(lse_all) if g_ent is None else g_ent.to(lse_all.dtype)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=acc_dtype(weight.dtype))
        chunk_dz = _triton_chunk_dz if kernel == "triton" else _torch_chunk_dz
        for a in range(0, hidden.shape[0], chunk):
            h, tgt = hidden[a:a + chunk], targets[a:a + chunk]
            dz = chunk_dz(h, weight, tgt, lse_all[a:a + chunk], ez_all[a:a + chunk], g_logp[a:a + chunk],
                          g_ent[a:a + chunk], temperature, vocab_size, group)  # weights' dtype, /temperature in
            grad_h[a:a + chunk] = dz @ weight
            if grad_w.dtype == weight.dtype:
                grad_w.addmm_(dz.t(), h)
            else:  # one rounding to bf16 per chunk product, the sum over chunks in fp32
                grad_w.add_(dz.t() @ h)
        if tp_size(group) > 1:
            dist.all_reduce(grad_h, group=group)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None


def logprob_entropy_fused_linear(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 temperature: float = 1.0, vocab_size: int | None = None, group=None,
                                 chunk_tokens: int | None = None,
                                 chunk_kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, H], weight shard [V_r, H], targets [T] -> (logp [T], entropy [T]) fp32, chunked over tokens.
    ``chunk_kernel``: "torch", "triton" (the Triton kernels per chunk; through Triton's interpreter on the CPU),
    or "auto": Triton for fp32/bf16/fp16 tensors on CUDA where it is installed, else torch."""
    if chunk_kernel == "auto":
        chunk_kernel = "triton" if hidden.is_cuda and hidden.dtype != torch.float64 and \
            importlib.util.find_spec("triton") is not None else "torch"
    if chunk_kernel not in ("torch", "triton"):
        raise ValueError(f"chunk_kernel={chunk_kernel!r}: choose 'auto', 'torch' or 'triton'.")
    vocab = vocab_size if vocab_size is not None else weight.shape[0] * tp_size(group)
    # the chunk's two [C, V_r] buffers: fp32 for the torch steps (8 bytes a value), the weights' dtype for Triton
    values = (1 << 25) if chunk_kernel == "torch" else (1 << 28) // (2 * weight.element_size())
    chunk_tokens = chunk_tokens or max(1, values // weight.shape[0])
    return FusedLinearLogprobEntropy.apply(hidden, weight, targets.contiguous(), float(temperature), vocab, group,
                                           chunk_tokens, chunk_kernel)
