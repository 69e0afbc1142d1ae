"""Vocab-parallel log-prob / entropy: one API, several implementations (``token_logprobs_entropy``).

    torch         reference.py        plain torch, fp32 [T, V_r]; the oracle
    triton        triton_logprobs.py  online softmax over the logits shard, fused fwd/bwd (CUDA; interpreter on CPU)
    fused_linear  chunked.py          output projection fused in, chunked over tokens: no [T, V] logits at all
    te            Transformer Engine's parallel cross entropy (log-probs only), when TE imports
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from megarl.kernels.chunked import logprob_entropy_fused_linear
from megarl.kernels.reference import logprob_entropy_reference

IMPLS = ("auto", "torch", "triton", "fused_linear", "te")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def te_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports (never on CPU-only machines)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # an ImportError, or TE's own error when CUDA/NCCL libraries are absent
        return False
    return True


def default_impl(from_hidden: bool) -> str:
    if from_hidden:
        return "fused_linear"
    return "triton" if torch.cuda.is_available() and triton_available() else "torch"


def token_logprobs_entropy(*, targets: torch.Tensor, logits: torch.Tensor | None = None,
                           hidden: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                           temperature: float = 1.0, vocab_size: int | None = None, group=None, impl: str = "auto",
                           chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and entropy per token, fp32 [T] each, differentiable.

    Give either ``logits`` (this TP rank's shard [T, V_r]) or ``hidden`` [T, H] with this rank's output weight
    shard ``weight`` [V_r, H]. ``vocab_size`` masks padded vocabulary columns; ``group`` is the TP group.
    """
    if (logits is None) == (hidden is None):
        raise ValueError("token_logprobs_entropy needs exactly one of logits=... or hidden=... (with weight=...).")
    if impl not in IMPLS:
        raise ValueError(f"kernels.impl='{impl}' is unknown; choose one of {', '.join(IMPLS)}.")
    if impl == "auto":
        impl = default_impl(hidden is not None)
    if hidden is not None:
        if impl != "fused_linear":
            raise ValueError(f"kernels.impl='{impl}' takes logits; with hidden states use 'fused_linear' or 'auto'.")
        if weight is None:
            raise ValueError("hidden=... needs the output-layer weight shard: weight=[V_r, H].")
        return logprob_entropy_fused_linear(hidden, weight, targets, temperature, vocab_size, group, chunk_tokens)
    if impl == "fused_linear":
        raise ValueError("kernels.impl='fused_linear' takes hidden=... and weight=..., not logits.")
    if impl == "torch":
        return logprob_entropy_reference(logits, targets, temperature, vocab_size, group)
    if impl == "triton":
        if not triton_available():
            raise ValueError("kernels.impl='triton' but triton is not installed; pip install triton or use 'torch'.")
        from megarl.kernels.triton_logprobs import logprob_entropy_triton

        return logprob_entropy_triton(logits, targets, temperature, vocab_size, group)
    return _te_logprobs(logits, targets, temperature, vocab_size, group)


def _te_logprobs(logits, targets, temperature, vocab_size, group):
    """Transformer Engine's fused parallel cross entropy gives -log p; it has no entropy output (returned NaN)."""
    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy
    except Exception as e:  # TE missing or unusable without CUDA
        raise ValueError(f"kernels.impl='te' but Transformer Engine does not import ({e}); use 'triton'.") from None
    from megarl.kernels.reference import shard_columns

    z = logits / temperature
    if vocab_size is not None:
        cols = shard_columns(z.shape[-1], group, z.device)
        z = z.masked_fill(cols >= vocab_size, float("-inf"))
    nll = parallel_cross_entropy(z.unsqueeze(0), targets.unsqueeze(0), 0.0, False, group).squeeze(0)
    return -nll.float(), torch.full_like(nll, float("nan"), dtype=torch.float32)
