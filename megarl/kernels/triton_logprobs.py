"""Triton kernels over the logits shard [T, V_r]: log p(target) and entropy without an fp32 [T, V] copy.

Forward, one program per token: an online softmax over vocabulary tiles keeps, in fp32 registers, the running
max m, S = sum exp(z - m), W = sum exp(z - m) z and the target logit. The host then combines the per-rank
partials over the TP group (M = max m_r; S = sum S_r e^{m_r - M}; W likewise), so one all-reduce of four [T]
vectors replaces any exchange of logits:

    lse = M + log S        logp = z_target - lse        H = lse - W / S

Backward, one program per token: dz = (g_logp (onehot - p) - g_H p (z - W/S)) / temperature, written straight
into the gradient of the logits in their own dtype.

On machines without CUDA the same kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, which
``megarl/__init__.py`` sets before anything imports Triton): exact but slow, used by the CPU tests.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megarl.kernels.tp import tp_rank, tp_size

# a finite "minus infinity": keeps exp(m_old - m_new) defined when a tile is all padding; a constexpr, since
# compiled Triton reads no other kind of global (its interpreter, on the CPU, reads any)
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _fwd_kernel(logits_ptr, stride, targets_ptr, m_ptr, s_ptr, w_ptr, t_ptr, V_r, v0, vocab_size, inv_temp,
                BLOCK: tl.constexpr):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row)
    row_ptr = logits_ptr + row.to(tl.int64) * stride  # int64: T x V passes 2^31 elements at T > 14,134 (V = 151,936)
    m = tl.full((), NEG, tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V_r, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = (cols < V_r) & (v0 + cols < vocab_size)
        z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        z = tl.where(valid, z, NEG)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.where(valid, tl.exp(z - m_new), 0.0)
        s = s * scale + tl.sum(e, axis=0)
        w = w * scale + tl.sum(tl.where(valid, e * z, 0.0), axis=0)
        t += tl.sum(tl.where(valid & (v0 + cols == target), z, 0.0), axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(w_ptr + row, w)
    tl.store(t_ptr + row, t)


@triton.jit
def _bwd_kernel(logits_ptr, grad_ptr, stride, targets_ptr, lse_ptr, ez_ptr, g_lp_ptr, g_ent_ptr, V_r, v0,
                vocab_size, inv_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row)
    offset = row.to(tl.int64) * stride  # see _fwd_kernel
    lse = tl.load(lse_ptr + row)
    ez = tl.load(ez_ptr + row)
    g_lp = tl.load(g_lp_ptr + row)
    g_ent = tl.load(g_ent_ptr + row)
    for start in range(0, V_r, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_shard = cols < V_r
        valid = in_shard & (v0 + cols < vocab_size)
        z = tl.load(logits_ptr + offset + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        p = tl.where(valid, tl.exp(z - lse), 0.0)
        onehot = tl.where(valid & (v0 + cols == target), 1.0, 0.0)
        dz = (g_lp * (onehot - p) - g_ent * p * (z - ez)) * inv_temp
        dz = tl.where(valid, dz, 0.0)
        tl.store(grad_ptr + offset + cols, dz.to(grad_ptr.dtype.element_ty), mask=in_shard)


@functools.cache
def _check_interpreter() -> None:
    """Triton <= 3.6's interpreter cannot run a loop over a runtime bound on numpy >= 2.4 (triton-lang/triton#9171)."""
    tv = tuple(int(x) for x in triton.__version__.split(".")[:2])
    nv = tuple(int(x) for x in np.__version__.split(".")[:2])
    if tv < (3, 7) and nv >= (2, 4):
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter (how its kernels run without CUDA) fails on "
                           f"numpy {np.__version__} (triton-lang/triton#9171); pip install 'triton>=3.7' or "
                           f"'numpy<2.4', or choose kernels.impl=auto.")


def _launch(kernel, grid, *args, **meta):
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if not torch.cuda.is_available() and not interpreted:
        raise RuntimeError("Triton kernels need CUDA or Triton's interpreter, and Triton was imported before "
                           "TRITON_INTERPRET=1 was set; import megarl first or export TRITON_INTERPRET=1.")
    if interpreted:
        _check_interpreter()
    kernel[grid](*args, **meta)


def _meta(width: int, block: int | None, num_warps: int | None) -> dict:
    """Launch parameters: the vocabulary tile (at most 4096 columns unless given) and Triton's warps per program
    (its default, 4, unless given; bench/logprob_kernels.py measures other choices on CUDA)."""
    meta = {"BLOCK": block or min(4096, triton.next_power_of_2(max(width, 16)))}
    if num_warps:
        meta["num_warps"] = num_warps
    return meta


def softmax_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, vocab_size: int, group,
                  block: int | None = None, num_warps: int | None = None):
    """(lse, E_p[z], z_target) per row of the logits shard [T, V_r] (contiguous), fp32, reduced over the TP group:
    the forward kernel's partials combined as in the module docstring. Also the per-chunk step of the fused output
    layer on CUDA (``chunked.py``)."""
    T, V_r = logits.shape
    parts = torch.empty(4, T, dtype=torch.float32, device=logits.device)  # m, S, W, z_target
    _launch(_fwd_kernel, (T,), logits, logits.stride(0), targets, parts[0], parts[1], parts[2], parts[3], V_r,
            tp_rank(group) * V_r, vocab_size, 1.0 / temperature, **_meta(V_r, block, num_warps))
    m, s, w, t = parts
    if tp_size(group) > 1:
        big_m = m.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(m - big_m)
        red = torch.stack([s * scale, w * scale, t])
        dist.all_reduce(red, group=group)
        m, (s, w, t) = big_m, red
    return m + torch.log(s), w / s, t


def logits_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ez: torch.Tensor,
                g_lp: torch.Tensor, g_ent: torch.Tensor, temperature: float, vocab_size: int, group,
                block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """dL/d logits [T, V_r] in the logits' dtype, from the upstream gradients of log p and entropy (fp32 [T])."""
    T, V_r = logits.shape
    grad = torch.empty_like(logits)
    _launch(_bwd_kernel, (T,), logits, grad, logits.stride(0), targets, lse, ez, g_lp.float().contiguous(),
            g_ent.float().contiguous(), V_r, tp_rank(group) * V_r, vocab_size, 1.0 / temperature,
            **_meta(V_r, block, num_warps))
    return grad


class TritonLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, vocab_size, group, block, num_warps):
        logits = logits.contiguous()
        lse, ez, t = softmax_stats(logits, targets, temperature, vocab_size, group, block, num_warps)
        ctx.save_for_backward(logits, targets, lse, ez)
        ctx.cfg = (temperature, vocab_size, group, block, num_warps)
        return t - lse, lse - ez

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, targets, lse, ez = ctx.saved_tensors
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent
        return logits_grad(logits, targets, lse, ez, g_lp, g_ent, *ctx.cfg), None, None, None, None, None, None


def logprob_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                           vocab_size: int | None = None, group=None, block: int | None = None,
                           num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits shard [T, V_r] (bf16/fp16/fp32), targets [T] -> (logp [T], entropy [T]) fp32. ``block`` (a power of
    two) and ``num_warps`` override the launch parameters (see ``_meta``)."""
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block={block}: the vocabulary tile must be a power of two >= 16")
    vocab = vocab_size if vocab_size is not None else logits.shape[-1] * tp_size(group)
    return TritonLogprobEntropy.apply(logits, targets.contiguous(), float(temperature), vocab, group, block,
                                      num_warps)
