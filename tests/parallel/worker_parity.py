"""torchrun worker: build every tiny family as a Megatron model at the launched TP/PP layout, compare its logits
and gradients with HF transformers (the independent reference), and save them for cross-layout comparison.
Log-probs and gradients are checked along both of the policy's paths: logits -> kernel, and hidden states ->
fused output layer (``hidden_states_out``, the default ``kernels.impl``), which never makes the logits.

    torchrun --nproc-per-node N tests/parallel/worker_parity.py --tp T --pp P [--sp] --out DIR

``--sp``: sequence parallelism (each TP rank holds 1/tp of the sequence between the TP matmuls): the same HF
references, with the norm gradients summed over TP by ``finalize_model_grads``.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", default="llama,mistral,qwen2,qwen2_untied,qwen3")
    args = ap.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megarl.backends.megatron.forward import (forward_backward, gather_logits, hidden_states_out, output_weight,
                                                  token_logprobs)
    from megarl.backends.megatron.model import build_model, unwrap
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.backends.megatron.weights import export_stage_hf, load_hf_weights
    from megarl.convert.arch import read_arch
    from megarl.convert.tiny import tiny_hf_model
    from megarl.distributed import distributed

    with distributed(), model_parallel(ParallelDims(args.tp, args.pp)):
        torch.manual_seed(123)
        ids = torch.randint(0, 300, (2, 12))
        targets = torch.randint(0, 300, (2, 12))
        for family in args.families.split(","):
            hf = tiny_hf_model(family, seed=7)
            arch = read_arch(hf.config.to_dict())
            hf_sd = hf.state_dict()
            # HF reference: logits and gradients of L = -mean log p(target)
            hf.zero_grad()
            hf_logits = hf(ids).logits
            hf_loss = -torch.log_softmax(hf_logits, -1).gather(-1, targets[..., None]).mean()
            hf_loss.backward()
            hf_grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters()}

            model = build_model(arch, sequence_parallel=args.sp)
            load_hf_weights(model, arch, hf_sd.__getitem__)
            layout = f"tp{args.tp} pp{args.pp}{' sp' * args.sp}"
            packed_matches_hf(model, arch, hf, family, layout)  # (the export below overwrites
            # the weights with gradients)
            mb = [{"input_ids": ids, "targets": targets}]
            logits = forward_backward(model, mb, lambda out, b: gather_logits(out, arch.vocab_size),
                                      forward_only=True)
            n_tok = targets.numel()
            hf_lp = torch.log_softmax(hf_logits.detach(), -1).gather(-1, targets[..., None]).squeeze(-1)

            def logprobs(out, b, hidden, model=model):  # the two ways the policy gets log p(target)
                weight = output_weight(model) if hidden else None
                return token_logprobs(out, b["targets"], arch.vocab_size, weight=weight)[0]

            with hidden_states_out(model):
                lp_hidden = forward_backward(model, mb, lambda o, b: logprobs(o, b, True), forward_only=True)
            lp_logits = forward_backward(model, mb, lambda o, b: logprobs(o, b, False), forward_only=True)
            if lp_logits:
                for lp in (lp_logits[0], lp_hidden[0]):
                    assert (lp - hf_lp).abs().max() < 1e-5, f"{family}: log-probs differ from HF"

            # the trainer's path: Megatron DDP buffers, then finalize_model_grads (DP all-reduce, tied
            # embedding sync across PP stages, TP all-reduce of qk-norm weights)
            ddp = DistributedDataParallel(unwrap(model).config, DistributedDataParallelConfig(), model)
            params = list(unwrap(model).parameters())
            main_grads = {}
            for hidden in (False, True):
                ddp.zero_grad_buffer()
                with hidden_states_out(ddp) if hidden else contextlib.nullcontext():
                    forward_backward(ddp, mb, lambda o, b: (-logprobs(o, b, hidden).sum() / n_tok, {}),
                                     forward_only=False)
                finalize_model_grads([ddp])
                main_grads[hidden] = [p.main_grad.detach().clone() for p in params]
            exported = {}
            for hidden, gs in main_grads.items():
                for p, g in zip(params, gs):
                    p.data = g  # export grads through the same key map as weights
                exported[hidden] = dict(export_stage_hf(model, arch))
            grads = exported[False]
            stage = ps.get_pipeline_model_parallel_rank()
            result = {"grads": grads, "logits": logits[0] if logits else None}
            for hidden, gs in exported.items():
                for name, g in gs.items():
                    torch.testing.assert_close(g, hf_grads[name], rtol=1e-4, atol=2e-6,
                                               msg=lambda m: f"{family} {name} (hidden={hidden}): {m}")
                    if hidden:
                        torch.testing.assert_close(g, grads[name], rtol=1e-5, atol=5e-7,
                                                   msg=lambda m: f"{family} {name}: fused vs logits path: {m}")
            if logits:
                diff = (logits[0] - hf_logits.detach()).abs().max().item()
                assert diff < 1e-5, f"{family}: Megatron vs HF logits max|diff| {diff:.3g} >= 1e-5"
                print(f"[tp{args.tp} pp{args.pp}] {family}: logits max|diff| vs HF = {diff:.3g}", flush=True)
            if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                torch.save(result, os.path.join(args.out, f"{family}_stage{stage}.pt"))
            del model
        dist.barrier()


def packed_matches_hf(model, arch, hf, family: str, layout: str) -> None:
    """Packed micro-batches (several, through the pipeline schedule) give each sample HF's log-probs alone, along
    both log-prob paths; every rank receives the result."""
    from megarl.backends.megatron.policy import rollout_logprobs
    from tests.unit.test_packed_forward import BUDGET, hf_reference, rollouts

    ro = rollouts()
    ref_lp, _ = hf_reference(hf, ro)
    for impl in ("auto", "torch"):
        lp, _ = rollout_logprobs(model, arch, ro, BUDGET, 1.0, impl, packing=True)
        diff = max((lp[r, :len(want)].double() - want).abs().max().item() for r, want in enumerate(ref_lp))
        assert diff < 2e-5, f"{family} ({layout}, {impl}): packed log-probs vs HF max|diff| {diff:.3g}"
    print(f"[{layout}] {family}: packed log-probs match HF", flush=True)


if __name__ == "__main__":
    main()
