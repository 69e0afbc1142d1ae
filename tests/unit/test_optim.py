"""The policy optimizer on a tiny Megatron model: schedule-free's averaged weights for checkpoints/exports against
the schedulefree package's own ``eval()``, fp32 and bf16 (main weights inside Megatron's wrapper)."""

from __future__ import annotations

import pytest
import torch

from megarl.convert.arch import read_arch
from megarl.convert.tiny import checkpoint_tensors, tiny_hf_model


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
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
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


@pytest.mark.parametrize("accumulate", ["policy", "bf16"])
def test_bf16_gradients_accumulate_over_micro_batches_exactly(megatron_world, accumulate):
    """K identical micro-batches must give exactly K x one micro-batch's gradient: each bf16 gradient has 8
    significant bits, so an fp32 buffer sums 7 of them without rounding, while a bf16 buffer rounds every partial
    sum. 'policy' is the trained model's DDP config (fp32 accumulation); 'bf16', megatron-core's default, is the
    counter-example that shows the test can fail."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megarl.backends.megatron.forward import forward_backward, token_logprobs
    from megarl.backends.megatron.model import build_model, transformer_config
    from megarl.backends.megatron.policy import ddp_config
    from megarl.backends.megatron.weights import load_hf_weights

    hf = tiny_hf_model("qwen2", seed=5)
    arch = read_arch(hf.config.to_dict())
    model = build_model(arch, dtype=torch.bfloat16, init_weights=False)
    load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
    cfg = ddp_config(torch.bfloat16, False) if accumulate == "policy" else DistributedDataParallelConfig()
    ddp = DistributedDataParallel(transformer_config(arch, torch.bfloat16), cfg, model)
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    k = 7

    def grads(micro_batches: int) -> dict[str, torch.Tensor]:
        def post(out, b):  # the loss is not divided by the micro-batch count (the losses normalise globally)
            lp, _ = token_logprobs(out, ids, arch.vocab_size)
            return -lp.sum() / ids.numel(), {}

        ddp.zero_grad_buffer()
        forward_backward(ddp, [{"input_ids": ids}] * micro_batches, post, forward_only=False)
        return {n: p.main_grad.float().clone() for n, p in ddp.module.named_parameters()}

    one, summed = grads(1), grads(k)
    exact = [n for n in one if torch.equal(summed[n], k * one[n])]
    assert any(one[n].count_nonzero() for n in one)
    if accumulate == "policy":
        assert next(ddp.module.parameters()).main_grad.dtype == torch.float32
        assert len(exact) == len(one), sorted(set(one) - set(exact))
    else:
        assert len(exact) < len(one) / 2, "a bf16 buffer summed 7 gradients exactly: the test cannot tell"
