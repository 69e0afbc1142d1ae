"""Log-prob / entropy implementations against a float64 oracle: values and gradients, temperature != 1, padded
vocabularies, chunk sizes that do not divide T. (TP=2 lives in tests/parallel/test_kernels_tp.py.)"""

from __future__ import annotations

import pytest
import torch

from megarl.kernels import token_logprobs_entropy

V_REAL, V_PAD = 300, 384


def oracle(logits64: torch.Tensor, targets: torch.Tensor, temperature: float):
    """float64 log_softmax over the real vocabulary."""
    lp = torch.log_softmax(logits64[:, :V_REAL] / temperature, -1)
    return lp.gather(1, targets[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)


def weighted(lp, ent, a, b):
    return (a * lp).sum() + (b * ent).sum()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    T = 11
    return dict(logits=torch.randn(T, V_PAD, generator=g, dtype=torch.float64) * 4,
                targets=torch.randint(0, V_REAL, (T,), generator=g),
                hidden=torch.randn(T, 24, generator=g, dtype=torch.float64),
                weight=torch.randn(V_PAD, 24, generator=g, dtype=torch.float64) * 0.5,
                a=torch.randn(T, generator=g, dtype=torch.float64), b=torch.randn(T, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("impl,dtype,tol", [("torch", torch.float64, 1e-12), ("torch", torch.float32, 2e-5),
                                            ("triton", torch.float32, 2e-5), ("triton", torch.bfloat16, 0.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logits_paths_match_the_float64_oracle(data, impl, dtype, tol, temperature):
    x = data["logits"].to(dtype)
    ref_in = x.detach().double().clone().requires_grad_(True)  # the oracle sees exactly the rounded inputs
    lp_o, ent_o = oracle(ref_in, data["targets"], temperature)
    weighted(lp_o, ent_o, data["a"], data["b"]).backward()
    x = x.detach().clone().requires_grad_(True)
    lp, ent = token_logprobs_entropy(logits=x, targets=data["targets"], temperature=temperature,
                                     vocab_size=V_REAL, impl=impl)
    assert lp.dtype in (torch.float32, torch.float64)
    weighted(lp.double(), ent.double(), data["a"], data["b"]).backward()
    vtol = tol or 2e-5  # bf16 inputs: the kernel computes in fp32 from the same rounded values
    torch.testing.assert_close(lp.double(), lp_o.detach(), rtol=vtol, atol=vtol * 10)
    torch.testing.assert_close(ent.double(), ent_o.detach(), rtol=vtol, atol=vtol * 10)
    gtol = tol or 1e-2  # the bf16 gradient is rounded to bf16 on store
    torch.testing.assert_close(x.grad.double(), ref_in.grad, rtol=gtol, atol=gtol * 0.1)
    assert torch.count_nonzero(x.grad[:, V_REAL:]) == 0  # padded columns get no gradient


@pytest.mark.parametrize("block", [16, 128])
def test_triton_online_softmax_across_vocabulary_tiles(data, block):
    """The default tile holds all 384 columns here; 16- and 128-column tiles make the kernels rescale their running
    sums tile by tile (as at V = 151,936, where the tile is 4,096); with 16, the last five tiles hold padding only."""
    from megarl.kernels.triton_logprobs import logprob_entropy_triton

    x = data["logits"].float().requires_grad_(True)
    ref_in = x.detach().double().requires_grad_(True)
    lp_o, ent_o = oracle(ref_in, data["targets"], 0.6)
    weighted(lp_o, ent_o, data["a"], data["b"]).backward()
    lp, ent = logprob_entropy_triton(x, data["targets"], 0.6, V_REAL, block=block, num_warps=8)
    weighted(lp.double(), ent.double(), data["a"], data["b"]).backward()
    torch.testing.assert_close(lp.double(), lp_o.detach(), rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(ent.double(), ent_o.detach(), rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(x.grad.double(), ref_in.grad, rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="power of two"):
        logprob_entropy_triton(x, data["targets"], block=100)


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_fused_linear_matches_the_oracle_without_logits(data, chunk, temperature):
    h = data["hidden"].clone().requires_grad_(True)
    w = data["weight"].clone().requires_grad_(True)
    lp, ent = token_logprobs_entropy(hidden=h, weight=w, targets=data["targets"], temperature=temperature,
                                     vocab_size=V_REAL, chunk_tokens=chunk)
    weighted(lp, ent, data["a"], data["b"]).backward()
    h0, w0 = data["hidden"].clone().requires_grad_(True), data["weight"].clone().requires_grad_(True)
    lp_o, ent_o = oracle(h0 @ w0.t(), data["targets"], temperature)
    weighted(lp_o, ent_o, data["a"], data["b"]).backward()
    torch.testing.assert_close(lp, lp_o.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ent_o.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, h0.grad, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(w.grad, w0.grad, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [1, 4, 11])
def test_fused_linear_with_the_triton_chunk_kernel_matches_the_oracle(data, chunk, dtype, tol):
    """The CUDA default (chunk_kernel=auto on CUDA): each chunk's statistics and dz from the Triton kernels, run
    here through Triton's interpreter, against float64 on the same rounded inputs."""
    from megarl.kernels.chunked import logprob_entropy_fused_linear

    h = data["hidden"].to(dtype).requires_grad_(True)
    w = data["weight"].to(dtype).requires_grad_(True)
    lp, ent = logprob_entropy_fused_linear(h, w, data["targets"], 1.3, V_REAL, chunk_tokens=chunk,
                                           chunk_kernel="triton")
    assert lp.dtype == torch.float32
    weighted(lp.double(), ent.double(), data["a"], data["b"]).backward()
    h0, w0 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    z = h0 @ w0.t()
    if dtype == torch.bfloat16:  # the chunk's logits are a bf16 matmul's output: the oracle sees them rounded
        z = z + (z.detach().bfloat16().double() - z.detach())
    lp_o, ent_o = oracle(z, data["targets"], 1.3)
    weighted(lp_o, ent_o, data["a"], data["b"]).backward()
    torch.testing.assert_close(lp.double(), lp_o.detach(), rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(ent.double(), ent_o.detach(), rtol=2e-5, atol=2e-4)
    assert h.grad.dtype == w.grad.dtype == dtype
    for got, want in ((h.grad, h0.grad), (w.grad, w0.grad)):
        assert float((got.double() - want).norm() / want.norm()) < tol


def test_only_logprob_gradient(data):
    x = data["logits"].clone().requires_grad_(True)
    lp, _ = token_logprobs_entropy(logits=x, targets=data["targets"], vocab_size=V_REAL, impl="triton")
    lp.sum().backward()  # entropy unused: its gradient arrives as None
    ref = data["logits"].clone().requires_grad_(True)
    oracle(ref, data["targets"], 1.0)[0].sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_bad_calls_name_the_fix(data):
    with pytest.raises(ValueError, match="exactly one of logits"):
        token_logprobs_entropy(targets=data["targets"])
    with pytest.raises(ValueError, match="kernels.impl='cuda' is unknown"):
        token_logprobs_entropy(logits=data["logits"], targets=data["targets"], impl="cuda")
    with pytest.raises(ValueError, match="needs the output-layer weight"):
        token_logprobs_entropy(hidden=data["hidden"], targets=data["targets"])
    with pytest.raises(ValueError, match="takes hidden"):
        token_logprobs_entropy(logits=data["logits"], targets=data["targets"], impl="fused_linear")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="Transformer Engine does not import"):
            token_logprobs_entropy(logits=data["logits"], targets=data["targets"], impl="te")


def test_a_broken_triton_interpreter_is_named_before_it_runs(data, monkeypatch):
    """triton <= 3.6 + numpy >= 2.4 (triton-lang/triton#9171) would fail deep inside the interpreter's loop."""
    if torch.cuda.is_available():
        pytest.skip("compiled Triton on CUDA: the interpreter is not used")
    import numpy as np
    import triton

    from megarl.kernels import triton_logprobs

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.5.2")
    triton_logprobs._check_interpreter.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"triton>=3.7.*numpy<2.4.*kernels.impl=auto"):
            token_logprobs_entropy(logits=data["logits"], targets=data["targets"], vocab_size=V_REAL, impl="triton")
    finally:
        triton_logprobs._check_interpreter.cache_clear()


def beyond_int32_offsets() -> None:
    """Both Triton kernels on a [3, 16] logits view whose row stride is 2^30 elements, so row 2 starts at element
    2^31: an int32 `row * stride` wraps there (as it does for real at T > 14,134 tokens of V = 151,936). The view
    lives in sparse files, so only the touched pages take memory. Run in a subprocess: a wrapped offset segfaults."""
    import os
    import tempfile

    from megarl.kernels import triton_logprobs as k

    stride, T, V = 2**30, 3, 16
    with tempfile.TemporaryDirectory() as d:
        def strided(name):
            path, n = os.path.join(d, name), (T - 1) * stride + V
            with open(path, "wb") as f:
                f.truncate(n * 4)
            return torch.from_file(path, shared=True, size=n, dtype=torch.float32).as_strided((T, V), (stride, 1))

        x, grad = strided("logits"), strided("grad")
        x.copy_(torch.randn(T, V, generator=torch.Generator().manual_seed(0)) * 3)
        targets = torch.tensor([1, 5, 9])
        parts = torch.empty(4, T)
        k._fwd_kernel[(T,)](x, stride, targets, *parts, V, 0, V, 1.0, BLOCK=16)
        lse, ez = parts[0] + parts[1].log(), parts[2] / parts[1]
        ref = x.double().clone().requires_grad_(True)
        lp, ent = oracle(ref, targets, 1.0)  # V = 16 < V_REAL: the whole row
        torch.testing.assert_close(parts[3] - lse, lp.float().detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse - ez, ent.float().detach(), rtol=1e-5, atol=1e-5)
        g_lp, g_ent = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.3, 0.1, -1.0])
        k._bwd_kernel[(T,)](x, grad, stride, targets, lse, ez, g_lp, g_ent, V, 0, V, 1.0, BLOCK=16)
        (g_lp.double() * lp + g_ent.double() * ent).sum().backward()
        torch.testing.assert_close(grad.clone(), ref.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.cli
def test_triton_kernels_address_rows_beyond_2_pow_31_elements():
    if torch.cuda.is_available():
        pytest.skip("CPU tensors need Triton's interpreter; on CUDA tests/gpu runs T = 16,384 at V = 151,936")
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", "from tests.unit.test_kernels import beyond_int32_offsets as f; f()"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode} (a wrapped offset segfaults or reads other memory):\n{r.stderr[-3000:]}"


def test_fused_linear_bf16_weight_gradient_does_not_degrade_with_the_chunk_count():
    """grad_W is a sum of T / C chunk products: in bf16 it must still be as accurate with 256 chunks as with one
    (summed in bf16 it was 1.8% off at 256 chunks, 10x bf16's own rounding)."""
    g = torch.Generator().manual_seed(3)
    T, H, V = 4096, 64, 256  # V < V_REAL: the oracle's row is the whole row
    h = torch.randn(T, H, generator=g).bfloat16()
    w = (torch.randn(V, H, generator=g) * 0.1).bfloat16().requires_grad_(True)
    targets, a = torch.randint(0, V, (T,), generator=g), torch.randn(T, generator=g)
    w64 = w.detach().double().requires_grad_(True)
    lp_o, ent_o = oracle(h.double() @ w64.t(), targets, 1.0)
    (a.double() * lp_o + 0.1 * ent_o).sum().backward()

    def rel_err(chunk):
        w.grad = None
        lp, ent = token_logprobs_entropy(hidden=h, weight=w, targets=targets, vocab_size=V, chunk_tokens=chunk)
        (a * lp + 0.1 * ent).sum().backward()
        assert w.grad.dtype == torch.bfloat16
        return float((w.grad.double() - w64.grad).norm() / w64.grad.norm())

    rounding = float((w64.grad.bfloat16().double() - w64.grad).norm() / w64.grad.norm())
    one, many = rel_err(T), rel_err(16)
    assert many < 1.5 * one and many < 2.5 * rounding, (one, many, rounding)
