"""The policy optimizer on a tiny Megatron model: schedule-free's averaged weights for checkpoints/exports against
the schedulefree package's own ``eval()``, fp32 and bf16 (main weights inside Megatron's wrapper)."""

from __future__ import annotations

import pytest
import torch

from megarl.convert.arch import read_arch
from megarl.convert.tiny import tiny_hf_model


def _stepped(dtype):
    """A DDP-wrapped tiny model and a schedule-free optimizer after two steps on a made-up loss."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megarl.backends.megatron.forward import forward_backward, token_logprobs
    from megarl.backends.megatron.model import build_model, transformer_config
    from megarl.backends.megatron.optim import build_optimizer
    from megarl.backends.megatron.weights import load_hf_weights

    hf = tiny_hf_model("qwen2", seed=4)
    arch = read_arch(hf.config.to_dict())
    model = build_model(arch, dtype=dtype, init_weights=False)
    load_hf_weights(model, arch, hf.state_dict().__getitem__)
    ddp = DistributedDataParallel(transformer_config(arch, dtype), DistributedDataParallelConfig(), model)
    opt, _ = build_optimizer([ddp], name="schedulefree", lr=1e-2, min_lr=0.0, weight_decay=0.0, betas=(0.9, 0.999),
                             grad_clip=1.0, bf16=dtype == torch.bfloat16, distributed=False, warmup_steps=0,
                             total_steps=4, schedule="constant")
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 8))

    def post(out, b):
        lp, _ = token_logprobs(out, ids, arch.vocab_size)
        return -lp.sum() / ids.numel(), {}

    for _ in range(2):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        forward_backward(ddp, [{"input_ids": ids}], post, forward_only=False)
        finalize_model_grads([ddp])
        opt.step()
    return ddp, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_averaged_weights_are_schedulefree_eval_point_and_leave_y_untouched(megatron_world, dtype):
    from megarl.backends.megatron.optim import averaged_weights, is_schedulefree, set_eval_point

    ddp, opt = _stepped(dtype)
    assert is_schedulefree(opt)
    y = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    with averaged_weights(opt):
        x = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    for n, p in ddp.module.named_parameters():
        assert torch.equal(p, y[n]), f"{n}: y not restored bit-exactly"
    assert any(not torch.equal(x[n], y[n]) for n in y), "x equals y: nothing was averaged"
    set_eval_point(opt, True)  # the package's own eval(): p <- x in place
    for n, p in ddp.module.named_parameters():  # the same lerp of the same (main, fp32) tensors: equal
        assert torch.equal(p, x[n]), f"{n}: differs from schedulefree's eval() point"
    set_eval_point(opt, False)
