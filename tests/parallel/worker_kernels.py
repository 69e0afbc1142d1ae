"""torchrun worker (TP=2 over the world group): every kernel on vocabulary shards against a float64 oracle
computed from the full tensors. V_pad = 384 puts all the padding on rank 1."""

from __future__ import annotations

import torch
import torch.distributed as dist


def main() -> None:
    from megarl.distributed import distributed
    from megarl.kernels import token_logprobs_entropy

    with distributed() as info:
        group, rank, tp = dist.group.WORLD, info.rank, info.world_size
        g = torch.Generator().manual_seed(5)
        T, V, VP, H, temp = 9, 300, 384, 20, 0.8
        logits = torch.randn(T, VP, generator=g, dtype=torch.float64) * 3
        hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
        weight = torch.randn(VP, H, generator=g, dtype=torch.float64) * 0.5
        targets = torch.randint(0, V, (T,), generator=g)
        a, b = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)
        cols = slice(rank * VP // tp, (rank + 1) * VP // tp)

        def oracle(x):
            lp = torch.log_softmax(x[:, :V] / temp, -1)
            return lp.gather(1, targets[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)

        ref = logits.clone().requires_grad_(True)
        lp_o, ent_o = oracle(ref)
        ((a * lp_o).sum() + (b * ent_o).sum()).backward()
        for impl, dtype, tol in (("torch", torch.float64, 1e-12), ("triton", torch.float32, 2e-5)):
            shard = logits[:, cols].to(dtype).clone().requires_grad_(True)
            lp, ent = token_logprobs_entropy(logits=shard, targets=targets, temperature=temp, vocab_size=V,
                                             group=group, impl=impl)
            ((a * lp.double()).sum() + (b * ent.double()).sum()).backward()
            torch.testing.assert_close(lp.double(), lp_o.detach(), rtol=tol, atol=tol * 10)
            torch.testing.assert_close(ent.double(), ent_o.detach(), rtol=tol, atol=tol * 10)
            torch.testing.assert_close(shard.grad.double(), ref.grad[:, cols], rtol=tol, atol=tol)
            print(f"rank {rank} {impl}: values and logits-shard gradient match", flush=True)

        h0, w0 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp_o, ent_o = oracle(h0 @ w0.t())
        ((a * lp_o).sum() + (b * ent_o).sum()).backward()
        h = hidden.clone().requires_grad_(True)
        w = weight[cols].clone().requires_grad_(True)
        lp, ent = token_logprobs_entropy(hidden=h, weight=w, targets=targets, temperature=temp, vocab_size=V,
                                         group=group, chunk_tokens=4)
        ((a * lp).sum() + (b * ent).sum()).backward()
        torch.testing.assert_close(lp, lp_o.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent, ent_o.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h.grad, h0.grad, rtol=1e-11, atol=1e-12)  # summed over both vocab shards
        torch.testing.assert_close(w.grad, w0.grad[cols], rtol=1e-11, atol=1e-12)
        print(f"rank {rank} fused_linear: values, hidden and weight-shard gradients match", flush=True)

        # the CUDA default: each chunk's statistics and dz from the Triton kernels (here through the interpreter)
        from megarl.kernels.chunked import logprob_entropy_fused_linear

        h = hidden.float().requires_grad_(True)
        w = weight[cols].float().requires_grad_(True)
        lp, ent = logprob_entropy_fused_linear(h, w, targets, temp, V, group, chunk_tokens=4, chunk_kernel="triton")
        ((a * lp.double()).sum() + (b * ent.double()).sum()).backward()
        torch.testing.assert_close(lp.double(), lp_o.detach(), rtol=2e-5, atol=2e-4)
        torch.testing.assert_close(ent.double(), ent_o.detach(), rtol=2e-5, atol=2e-4)
        torch.testing.assert_close(h.grad.double(), h0.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w.grad.double(), w0.grad[cols], rtol=1e-4, atol=1e-5)
        print(f"rank {rank} fused_linear triton chunks: values, hidden and weight-shard gradients match", flush=True)


if __name__ == "__main__":
    main()
