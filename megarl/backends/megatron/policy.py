"""The actor and the reference model on Megatron: log-probs of rollouts, and the policy-gradient update.

Both run every micro-batch through ``forward_backward`` (any TP/PP layout); per-token log-probs and entropies come
from the vocab-parallel kernels of ``megarl.kernels`` at response positions only. With ``kernels.impl`` auto or
fused_linear the model's last stage hands back hidden states and the kernel applies the output layer to the
response positions in chunks, so no [tokens, vocab] logits tensor exists at any point (it is the largest
activation of RL training: fp32 [b, s, V / tp] after Float16Module); with triton/torch/te the output layer's
logits are computed for every position and the response positions' logits are fed to the kernel. Results are
broadcast from the last pipeline stage so that every rank holds the same rollout tensors.

The update of one mini-batch (``MegatronPolicy.train_step``):

    counts  = sum over micro-batches and DP ranks of loss.counts(micro-batch)      (global normalisers)
    grads   = sum over micro-batches of d loss(micro-batch; counts) / d theta     (Megatron DDP sums over DP:
                                                                                  calculate_per_token_loss=True)
    step    : clip the global grad norm, optimizer step, LR scheduler step

so the result is independent of how the mini-batch is split over micro-batches and DP ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from megarl.backends.megatron import context_parallel as cp
from megarl.backends.megatron import moe
from megarl.backends.megatron.checkpoint import load_training_state, save_model, save_training_state, write_meta
from megarl.backends.megatron.export import export_hf_weights
from megarl.backends.megatron.generator import broadcast_from_last_stage
from megarl.backends.megatron.forward import (forward_backward, hidden_states_out, output_weight, sequence_multiple,
                                              token_logprobs)
from megarl.backends.megatron.model import unwrap
from megarl.backends.megatron.optim import averaged_weights, build_optimizer, is_schedulefree, set_eval_point, zero_grad
from megarl.convert.arch import ModelArch
from megarl.convert.hf_io import ShardedWriter, atomic_output_dir, copy_side_files
from megarl.distributed import all_reduce_sum
from megarl.losses.base import LossInput
from megarl.losses.registry import PolicyLoss
from megarl.backends.megatron.packing import packed_seq_params
from megarl.rollout.batch import MicroBatch, Rollouts, row_field
from megarl.rollout.packing import micro_batches


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _mb_inputs(mb: MicroBatch) -> dict:
    dev = _device()
    out = {"input_ids": mb.input_ids.to(dev), "mb": mb}
    if mb.padding is not None:
        out["padding"] = mb.padding.to(dev)
    if mb.cu_seqlens is None:
        return out
    return {**out, "position_ids": mb.position_ids.to(dev),
            "model_kwargs": {"packed_seq_params": packed_seq_params(mb.cu_seqlens, mb.max_seqlen, dev)}}


def uses_hidden_states(impl: str) -> bool:
    """Whether ``impl`` (kernels.impl) works from the hidden states (fused output layer) rather than logits."""
    return impl in ("auto", "fused_linear")


def response_logprobs(model: torch.nn.Module, arch: ModelArch, out: torch.Tensor, mb: MicroBatch,
                      temperature: float, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, entropy) of the micro-batch's response tokens -> [b, R] each (0 past a row's end), from the last
    stage's output ``out``:
    hidden states [b, s, H] when ``uses_hidden_states(impl)`` (run inside ``hidden_states_out``), else
    vocab-parallel logits [b, s, V/tp]."""
    # only the real response tokens go through the output layer / kernel: the [b, R] grid's padding columns (rows
    # shorter than the longest response) would cost vocab-sized work each, and long-tailed lengths leave many
    valid = mb.mask.to(out.device) > 0
    pos = mb.resp_positions.to(out.device)[valid]  # into the flattened [b_in * s] positions (packed: b_in = 1)
    targets = mb.resp_tokens.to(out.device)[valid]
    held = None
    if unwrap(model).config.context_parallel_size > 1:  # this rank holds a part of each sequence
        held, pos = cp.pick_local(pos, mb.input_ids.shape[1],
                                  None if mb.cu_seqlens is None else mb.cu_seqlens.tolist())
        targets = targets[held]
    picked = out.reshape(-1, out.shape[-1])[pos][None]  # [1, N, H or V/tp]
    if uses_hidden_states(impl):
        lp, ent = token_logprobs(picked, targets[None], arch.vocab_size, temperature, "fused_linear",
                                 output_weight(model))
    else:
        lp, ent = token_logprobs(picked, targets[None], arch.vocab_size, temperature, impl)
    lp, ent = lp[0], ent[0]
    if held is not None:  # every rank of the group: the whole micro-batch's values
        lp, ent = cp.combine_tokens(lp, held), cp.combine_tokens(ent, held)
    grid = torch.zeros(valid.shape, dtype=lp.dtype, device=lp.device)
    if not lp.numel():  # no response token at all: zeros that still depend on the model (a backward needs them)
        return grid + 0.0 * out.sum(), grid + 0.0 * out.sum()
    if not pos.numel():  # none on this context-parallel rank: its output still takes part in the backward
        lp, ent = lp + 0.0 * out.sum(), ent + 0.0 * out.sum()
    return grid.masked_scatter(valid, lp), grid.masked_scatter(valid, ent)


def _model_output(model: torch.nn.Module, impl: str):
    return hidden_states_out(model) if uses_hidden_states(impl) else contextlib.nullcontext()


@torch.no_grad()
def rollout_logprobs(model: torch.nn.Module, arch: ModelArch, ro: Rollouts, token_budget: int,
                     temperature: float, impl: str = "auto",
                     packing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, entropy) [B, R] float32 of every response of ``ro`` under ``model``, on every rank; ``packing``:
    through packed micro-batches (rollout/packing.py), rows placed one by one."""
    model.eval()
    if len(ro) == 0:  # dynamic sampling emptied this replica (at ep > 1 it still joins the others' passes)
        forward_backward(model, [], lambda o, d: None, forward_only=True)
        return torch.zeros(0, 1), torch.zeros(0, 1)
    mbs = micro_batches(ro, ro.groups(), token_budget, packing=packing, align=2 * cp.cp_size(),
                        multiple=sequence_multiple(model))
    with _model_output(model, impl):
        out = forward_backward(model, [_mb_inputs(mb) for mb in mbs],
                               lambda o, d: torch.stack(response_logprobs(model, arch, o, d["mb"], temperature,
                                                                          impl)).float(),
                               forward_only=True)
    shape = (2, len(ro), ro.max_response_len)
    full = None
    if out:
        full = torch.zeros(shape, dtype=torch.float32, device=_device())
        for mb, t in zip(mbs, out):
            full[:, torch.tensor(mb.rows), : t.shape[-1]] = t * mb.mask.to(t.device)
    if full is None:  # not the last stage: receive it
        full = torch.empty(shape, dtype=torch.float32, device=_device())
    full = broadcast_from_last_stage(full).cpu()
    return full[0], full[1]


class MegatronReference:
    """A frozen copy of the initial policy (the KL reference of GRPO, TRPA, A*-PO). ``offload`` keeps it in host
    memory between uses on GPU machines."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch, offload: bool = False, kernel_impl: str = "auto",
                 packing: bool = False):
        self.model, self.arch, self.offload = model, arch, offload and torch.cuda.is_available()
        self.kernel_impl, self.packing = kernel_impl, packing
        for p in model.parameters():
            p.requires_grad_(False)
        if self.offload:
            self.model.cpu()

    def logprobs(self, ro: Rollouts, token_budget: int, temperature: float) -> torch.Tensor:
        if self.offload:
            self.model.to(_device())
        try:
            return rollout_logprobs(self.model, self.arch, ro, token_budget, temperature, self.kernel_impl,
                                    self.packing)[0]
        finally:
            if self.offload:
                self.model.cpu()
                torch.cuda.empty_cache()


def ddp_config(params_dtype: torch.dtype, distributed_optimizer: bool) -> DistributedDataParallelConfig:
    """Megatron DDP settings of the trained model. bf16 weights accumulate their gradients over micro-batches (and
    all-reduce them) in an fp32 buffer, Megatron-LM's own rule for bf16 ("bfloat16 requires gradient accumulation
    and all-reduce to be done in fp32", megatron/training/arguments.py), which megatron-core's config leaves off by
    default. It also spares the optimizer its per-step fp32 copy of bf16 gradients: 18 bytes/param instead of 20."""
    return DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer,
                                         grad_reduce_in_fp32=params_dtype == torch.bfloat16)


class MegatronPolicy:
    """The trained model: Megatron DDP around the GPTModel stage of this rank, its optimizer and scheduler."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch, optim: dict, total_optimizer_steps: int,
                 kernel_impl: str = "auto", source_dir: Path | None = None, packing: bool = False):
        self.arch, self.kernel_impl, self.source_dir = arch, kernel_impl, source_dir  # source: the HF model dir
        self.packing = packing  # train.packing: packed micro-batches (rollout/packing.py)
        self.dtype = dtype = unwrap(model).config.params_dtype
        # the model's own config (megatron-core's way): one config, with the run's MoE and recompute settings
        self.model = DistributedDataParallel(unwrap(model).config, ddp_config(dtype, optim["distributed"]), model)
        self.optimizer, self.scheduler = build_optimizer(
            [self.model], bf16=unwrap(model).config.bf16, total_steps=total_optimizer_steps, **optim)
        self.version = 0  # bumped whenever the weights change (updates, schedule-free point swaps, loads)

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module

    def rollout_point(self, active: bool) -> None:
        """Schedule-free: weights at the averaged point x for rollouts and old log-probs (``active=True``), back
        at y for updates. No effect with AdamW."""
        set_eval_point(self.optimizer, active)
        if is_schedulefree(self.optimizer):
            self.version += 1

    def logprobs(self, ro: Rollouts, token_budget: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        return rollout_logprobs(self.model, self.arch, ro, token_budget, temperature, self.kernel_impl, self.packing)

    def save(self, out: Path) -> dict:
        """Write this policy's checkpoint into ``out`` (collective): megarl.json and hf/ (so it is also a model
        checkpoint for convert, eval and export), model/ (weights and optimizer, torch_dist, loadable at another
        layout); schedule-free adds eval_model/ (the averaged x, which those read). Returns the JSON-able state
        that goes into trainer_state.json (the LR scheduler)."""
        averaged = is_schedulefree(self.optimizer)
        if dist.get_rank() == 0:
            (out / "hf").mkdir()
            copy_side_files(self.source_dir, out / "hf")
            write_meta(out, self.arch, self.dtype, str(self.source_dir), weights="eval_model" if averaged else "model")
            (out / "model").mkdir()
            if averaged:
                (out / "eval_model").mkdir()
        dist.barrier()
        save_training_state(self.module, self.optimizer, out / "model")
        if averaged:
            with averaged_weights(self.optimizer):
                save_model(self.module, out / "eval_model")
        return {"scheduler": self.scheduler.state_dict()}

    def load(self, ckpt: Path, state: dict) -> None:
        """Restore what ``save`` wrote (``state``: its returned dict, from trainer_state.json). Collective."""
        load_training_state(self.module, self.optimizer, ckpt / "model")
        self.scheduler.load_state_dict(state["scheduler"])
        self.version += 1

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors in bounded buckets (TP shards gathered, stages broadcast); tied embeddings also
        yield ``lm_head.weight`` (an engine may keep a separate copy of the output layer)."""
        for bucket in export_hf_weights(self.module, self.arch):
            for name, tensor in bucket:
                yield name, tensor
                if self.arch.tie_embeddings and name == "model.embed_tokens.weight":
                    yield "lm_head.weight", tensor

    def export_hf(self, out: Path) -> None:
        """The policy as a Hugging Face model directory (schedule-free: the averaged point x, exactly: the training
        weights y are restored bit for bit afterwards). Collective; the main rank writes, atomically."""
        with averaged_weights(self.optimizer):
            main = dist.get_rank() == 0
            ctx = atomic_output_dir(out, overwrite=True) if main else None
            tmp = ctx.__enter__() if main else None
            writer = ShardedWriter(tmp) if main else None
            for bucket in export_hf_weights(self.module, self.arch, bucket_bytes=64 << 20):
                for name, tensor in bucket if main else ():
                    writer.add(name, tensor.cpu())
            if main:
                writer.close()
                copy_side_files(self.source_dir, tmp)
                ctx.__exit__(None, None, None)
            dist.barrier()

    def probe_logprobs(self, ids: list[int]) -> list[float]:
        ro = Rollouts([ids[:1]], [ids[1:]], [[]], ["length"], torch.zeros(1, dtype=torch.int64))
        return self.logprobs(ro, token_budget=len(ids), temperature=1.0)[0][0].tolist()

    def train_step(self, ro: Rollouts, groups: list[list[int]], loss_fn: PolicyLoss, token_budget: int,
                   temperature: float) -> dict[str, float]:
        """One optimizer step on the mini-batch made of ``groups`` (row indices of ``ro``). Every rank calls it,
        also with no groups (dynamic sampling can empty a rank): its DP all-reduce is still needed."""
        self.model.train()
        mbs = micro_batches(ro, groups, token_budget, packing=self.packing, whole_groups=loss_fn.whole_groups,
                            align=2 * cp.cp_size(), multiple=sequence_multiple(self.model))
        rollout_lp = ro.rollout_logprobs()
        inputs = [self._loss_input(ro, mb, mb.mask.new_zeros(mb.mask.shape), None, rollout_lp=rollout_lp)
                  for mb in mbs]
        local = {}
        for inp in inputs:
            for k, v in loss_fn.counts(inp).items():
                local[k] = local.get(k, 0.0) + v
        dp = parallel_state.get_data_parallel_group()
        shape = {"_padded": float(sum(mb.input_ids.numel() for mb in mbs)),
                 "_real": float(sum(mb.tokens for mb in mbs))}
        counts = all_reduce_sum({**{k: local.get(k, 0.0) for k in loss_fn.spec.normalisers}, **shape}, dp)
        shape = {k: counts.pop(k) for k in shape}  # over the DP ranks: the mini-batch's padding
        batch = {"batch/padding_fraction": 1.0 - shape["_real"] / max(shape["_padded"], 1.0),  # the busiest rank's:
                 "batch/micro_batches": all_reduce_sum({"n": float(len(mbs))}, dp, dist.ReduceOp.MAX)["n"]}

        def post(out, d):
            mb = d["mb"]
            lp, ent = response_logprobs(self.model, self.arch, out, mb, temperature, self.kernel_impl)
            loss, metrics = loss_fn(self._loss_input(ro, mb, lp, ent, counts, rollout_lp))
            return loss, {"loss/total": float(loss.detach()), **{f"loss/{k}": v for k, v in metrics.items()}}

        self.model.zero_grad_buffer()
        zero_grad(self.optimizer)
        # MoE: router losses as means over the step's real tokens (moe.router_losses_scaled), router metrics
        with _model_output(self.model, self.kernel_impl), moe.RouterStats(self.model) as routers, \
                moe.router_losses_scaled(self.model, 1.0 / max(shape["_real"], 1.0)):
            per_mb = forward_backward(self.model, [_mb_inputs(mb) for mb in mbs], post, forward_only=False)
        finalize_model_grads([self.model])
        batch.update(routers.metrics())
        if not self._grads_finite():  # a NaN/inf loss or gradient: no update at all (weights and schedule kept)
            return {**self._reduce_metrics(per_mb, False, 0.0), **batch, "optim/nonfinite": 1.0}
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        self.version += 1
        return {**self._reduce_metrics(per_mb, ok, grad_norm), **batch, "optim/nonfinite": 0.0}

    def _grads_finite(self) -> bool:
        """Whether every rank's gradients (Megatron DDP's main_grad buffers, already summed over DP) are finite."""
        grads = [p.main_grad for p in self.model.parameters() if getattr(p, "main_grad", None) is not None]
        # a NaN/inf anywhere makes its tensor's norm, and so the sum, non-finite: one reduction, one sync per step
        total = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros(())
        flag = torch.isfinite(total).float().reshape(1).to(next(self.model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def _loss_input(self, ro: Rollouts, mb: MicroBatch, logprobs: torch.Tensor, entropy: torch.Tensor | None,
                    counts: dict | None = None, rollout_lp: torch.Tensor | None = None) -> LossInput:
        dev = logprobs.device

        def f(t):
            x = row_field(t, mb)
            return None if x is None else x.to(dev)

        return LossInput(logprobs=logprobs, mask=mb.mask.to(dev), old_logprobs=f(ro.old_logprobs),
                         ref_logprobs=f(ro.ref_logprobs), advantages=f(ro.advantages),
                         rewards=f(ro.rewards), group_ids=f(ro.group_ids), levels=f(ro.levels),
                         v_star=f(ro.v_star), entropy=entropy, counts=counts, rollout_logprobs=f(rollout_lp),
                         selected=f(ro.selected))

    def _reduce_metrics(self, per_mb: list[dict], ok: bool, grad_norm) -> dict[str, float]:
        """Every ``loss/*`` metric summed over micro-batches and DP ranks: each micro-batch's value is its share of
        the mini-batch's (its sum over a GLOBAL normaliser, ``losses.base``), or a count, so the sum is the
        mini-batch's value at any layout. Only the last stage's TP (and CP) rank 0 contributes, once per
        data-parallel replica."""
        contributes = (parallel_state.is_pipeline_last_stage() and
                       parallel_state.get_tensor_model_parallel_rank() == 0 and
                       parallel_state.get_context_parallel_rank() == 0)
        sums: dict[str, float] = {}
        for m in per_mb if contributes else []:
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        names: list = [None] * dist.get_world_size()  # an emptied rank has no names; every rank reduces all
        dist.all_gather_object(names, sorted(sums))
        out = all_reduce_sum({k: sums.get(k, 0.0) for k in sorted(set().union(*map(set, names)))})
        out["optim/grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        out["optim/lr"] = float(self.optimizer.param_groups[0]["lr"])
        out["optim/skipped"] = 0.0 if ok else 1.0
        return out
