"""torchrun worker: every tiny family at the launched TP x CP x PP layout, through the policy's own paths, against
HF transformers (each sample run alone, the independent reference):

- response log-probs and entropies of a batch of uneven samples (``rollout_logprobs``, both the fused output
  layer and the logits -> kernel path, right-padded and packed), on every rank;
- the gradient of L = -(sum of response log-probs) / N through Megatron DDP + ``finalize_model_grads`` (which sums
  the context-parallel ranks' partial gradients), right-padded and packed, exported through the conversion key map;
- greedy samples of the native generator (whole sequences on every context-parallel rank).

Results are saved for the cross-layout comparison in tests/parallel/test_context_parallel.py.

    torchrun --nproc-per-node N tests/parallel/worker_cp.py --tp T --cp C --pp P --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")  # sequence parallelism over the TP ranks
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", default="llama,mistral,qwen2,qwen2_untied,qwen3")
    args = ap.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megarl.backends.megatron.forward import forward_backward, hidden_states_out, sequence_multiple
    from megarl.backends.megatron.generator import MegatronGenerator
    from megarl.backends.megatron.model import build_model, unwrap
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.backends.megatron.policy import _mb_inputs, response_logprobs, rollout_logprobs
    from megarl.backends.megatron.weights import export_stage_hf, load_hf_weights
    from megarl.backends.protocols import SamplingParams
    from megarl.convert.arch import read_arch
    from megarl.convert.tiny import checkpoint_tensors, tiny_hf_model
    from megarl.distributed import distributed
    from megarl.rollout.batch import Rollouts
    from megarl.rollout.packing import micro_batches
    from tests.unit.test_packed_forward import BUDGET, hf_reference, rollouts

    layout = f"tp{args.tp} cp{args.cp} pp{args.pp}{' sp' * args.sp}"
    with distributed(), model_parallel(ParallelDims(args.tp, args.pp, args.cp)):
        base = rollouts()  # uneven samples, plus one of a single prompt and response token: its micro-batch is
        # shorter than 2 cp, so padding fills most of it and some context-parallel rank holds no response token
        prompts, responses = base.prompt_ids + [[7]], base.response_ids + [[9]]
        ro = Rollouts(prompts, responses, [[0.0] * len(r) for r in responses], ["stop"] * len(prompts),
                      torch.arange(len(prompts)))
        n_tok = sum(len(r) for r in ro.response_ids)
        for family in args.families.split(","):
            hf = tiny_hf_model(family, seed=7)
            arch = read_arch(hf.config.to_dict())
            ref_lp, ref_ent = hf_reference(hf, ro)
            hf.zero_grad()
            hf_loss = 0.0
            for p, y in zip(ro.prompt_ids, ro.response_ids):
                logp = torch.log_softmax(hf(torch.tensor([p + y])).logits[0, len(p) - 1:len(p) - 1 + len(y)], -1)
                hf_loss = hf_loss - logp.gather(1, torch.tensor(y)[:, None]).sum() / n_tok
            hf_loss.backward()
            hf_grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters()}

            model = build_model(arch, sequence_parallel=args.sp)
            load_hf_weights(model, arch, checkpoint_tensors(hf).__getitem__)
            result = {}
            for impl, packing in itertools.product(("auto", "torch"), (False, True)):
                # hidden states -> fused output layer, or logits -> kernel; right-padded rows, or packed segments
                lp, ent = rollout_logprobs(model, arch, ro, BUDGET, 1.0, impl, packing=packing)
                name = f"{impl}{' packed' if packing else ''}"
                for r, (want, want_ent) in enumerate(zip(ref_lp, ref_ent)):
                    n = len(want)
                    assert (lp[r, :n].double() - want).abs().max() < 1e-5, f"{family} {name}: log-probs vs HF"
                    assert (ent[r, :n].double() - want_ent).abs().max() < 1e-5, f"{family} {name}: entropy vs HF"
                result[f"logprobs {name}"] = lp
            greedy = SamplingParams(max_tokens=6, temperature=0.0)
            done = MegatronGenerator(model, arch).generate([p for p in ro.prompt_ids[:3]], 2, greedy)
            result["greedy"] = [c.token_ids for out in done for c in out]

            ddp = DistributedDataParallel(unwrap(model).config, DistributedDataParallelConfig(), model)

            def loss(out, d, ddp=ddp):
                lp, _ = response_logprobs(ddp, arch, out, d["mb"], 1.0, "auto")
                return -(lp * d["mb"].mask.to(lp.device)).sum() / n_tok, {}

            ddp.train()
            grads = {}
            for packing in (False, True):
                mbs = micro_batches(ro, [[i] for i in range(len(ro))], BUDGET, packing=packing, align=2 * args.cp,
                                    multiple=sequence_multiple(model))
                ddp.zero_grad_buffer()
                with hidden_states_out(ddp):
                    forward_backward(ddp, [_mb_inputs(mb) for mb in mbs], loss, forward_only=False)
                finalize_model_grads([ddp])
                grads[packing] = [p.main_grad.detach().clone() for p in unwrap(model).parameters()]
            for packing, gs in grads.items():
                for p, g in zip(unwrap(model).parameters(), gs):
                    p.data = g  # export grads through the same key map as weights
                exported = dict(export_stage_hf(model, arch))
                for name, g in exported.items():
                    torch.testing.assert_close(g, hf_grads[name], rtol=1e-4, atol=2e-6,
                                               msg=lambda m: f"{family} {name} ({layout}, packed={packing}): {m}")
                result["grads" if not packing else "grads packed"] = exported
            print(f"[{layout}] {family}: log-probs, entropies and gradients match HF", flush=True)
            if ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
                torch.save(result, os.path.join(args.out, f"{family}_stage{ps.get_pipeline_model_parallel_rank()}.pt"))
            del model, ddp
        dist.barrier()


if __name__ == "__main__":
    main()
