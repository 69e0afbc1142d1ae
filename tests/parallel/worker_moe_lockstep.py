"""torchrun worker (2 ranks, data-parallel): the gradient of a tiny Qwen3-MoE when rank 0 has two micro-batches and
rank 1 one, with both router losses on, through the trainer's path (Megatron DDP, ``moe.router_losses_scaled``
over the step's real tokens, ``finalize_model_grads``), exported under HF names and saved by rank 0.

    torchrun --nproc-per-node 2xP tests/parallel/worker_moe_lockstep.py --ep E --pp P --recompute R --out FILE

With --pp 2 each stage's first data-parallel rank saves its stage's gradients to FILE.stage<k>.

At ep = 2 the two ranks' MoE layers exchange tokens in every pass, so rank 1 adds a padding pass
(``forward.forward_backward``), which must add nothing to any gradient; at ep = 1 it does not
(``test_moe_parallel.py``).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from megarl.backends.megatron import moe
    from megarl.backends.megatron.forward import forward_backward, token_logprobs
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.distributed import distributed
    from tests.parallel.moe_worker import exported_gradients, tiny_moe_ddp

    with distributed(), model_parallel(ParallelDims(pp=args.pp, ep=args.ep)):
        arch, model, ddp = tiny_moe_ddp(recompute=args.recompute)
        g = torch.Generator().manual_seed(0)
        lengths = [[16, 11], [7, 16], [12, 5]]  # micro-batches 0, 1 on rank 0; 2 on rank 1
        batches = []
        for real in lengths:
            padding = torch.arange(16)[None, :] >= torch.tensor(real)[:, None]
            batches.append({"input_ids": torch.randint(0, 300, (2, 16), generator=g), "padding": padding,
                            "targets": torch.randint(0, 300, (2, 16), generator=g)})
        total = float(sum(sum(real) for real in lengths))
        dp_rank = parallel_state.get_data_parallel_rank()
        mine = batches[:2] if dp_rank == 0 else batches[2:]

        def loss(out, mb):  # the log-prob of every real target, over the step's real tokens
            lp = token_logprobs(out, mb["targets"], arch.vocab_size)[0]
            return -(lp * (~mb["padding"]).float()).sum() / total, {}

        with moe.router_losses_scaled(ddp, 1.0 / total):
            forward_backward(ddp, mine, loss, forward_only=False)
        finalize_model_grads([ddp])
        grads = exported_gradients(model, arch)
        if dp_rank == 0:
            stage = parallel_state.get_pipeline_model_parallel_rank()
            torch.save(grads, args.out if args.pp == 1 else f"{args.out}.stage{stage}")


if __name__ == "__main__":
    main()
