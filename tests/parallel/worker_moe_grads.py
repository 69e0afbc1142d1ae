"""torchrun worker: the gradient of a tiny Qwen3-MoE at the launched layout for one micro-batch, with the
load-balancing loss and the z-loss on, through the trainer's path (Megatron DDP, ``moe.router_losses_scaled``
with the step's token count, ``finalize_model_grads``), exported under HF names and saved by global rank 0.

    torchrun --nproc-per-node N tests/parallel/worker_moe_grads.py --tp T --cp C [--sp] --out FILE

The micro-batch (2 x 16 tokens) splits evenly at every layout tested; with ``--pad`` its second row holds 9 real
tokens and 7 of padding (the padding mask given), so the ranks' parts hold unequal numbers of real tokens. The
gradients must equal the one-rank run's (``test_moe_parallel.py``).

    torchrun --nproc-per-node N tests/parallel/worker_moe_grads.py --tp T --cp C [--sp] [--pad] --out FILE
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--pad", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core.distributed import finalize_model_grads

    from megarl.backends.megatron import moe
    from megarl.backends.megatron.forward import forward_backward, token_logprobs
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.distributed import distributed
    from tests.parallel.moe_worker import exported_gradients, tiny_moe_ddp

    with distributed(), model_parallel(ParallelDims(args.tp, 1, args.cp, sp=args.sp)):
        arch, model, ddp = tiny_moe_ddp(sequence_parallel=args.sp)
        g = torch.Generator().manual_seed(0)
        ids, targets = torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g)
        cp = args.cp

        padding = torch.arange(16)[None, :] >= torch.tensor([16, 9 if args.pad else 16])[:, None]
        real = (~padding).float()

        def loss(out, _):  # the mean log-prob of every real target this rank holds, summed over the group by DDP
            lp = token_logprobs(out, targets if cp == 1 else _local(targets, cp), arch.vocab_size)[0]
            return -(lp * (real if cp == 1 else _local(real, cp))).sum() / real.sum(), {}

        with moe.router_losses_scaled(ddp, 1.0 / float(real.sum())):
            forward_backward(ddp, [{"input_ids": ids, "padding": padding}], loss, forward_only=False)
        finalize_model_grads([ddp])
        grads = exported_gradients(model, arch)
        if dist.get_rank() == 0:
            torch.save(grads, args.out)


def _local(t: torch.Tensor, cp: int) -> torch.Tensor:
    """This context-parallel rank's columns of ``t`` [b, s], in the order its output holds them."""
    from megatron.core import parallel_state

    from megarl.backends.megatron.context_parallel import local_positions

    return t[:, local_positions(t.shape[1], cp, parallel_state.get_context_parallel_rank())]


if __name__ == "__main__":
    main()
