"""Mixture-of-experts training around megatron-core's MoE layers: the router losses' normaliser, lock-step passes
over the expert-parallel group, and the router metrics of a step (docs/moe.md).

Lock step: every forward pass of a MoE layer is an all-to-all (or all-gather) over the expert-parallel ranks, so
those ranks must run the same number of passes even when they hold different prompts: ``passes_in_step`` gives
the count a rank pads to (``forward.forward_backward`` pads with passes whose output is discarded and whose
router losses are off), and ``all_done`` ends a generation only when every rank's rows are done.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.moe.router import TopKRouter

from megarl.backends.megatron.model import unwrap
from megarl.distributed import comm_device


def _ep_group():
    """The expert-parallel group, or None when experts are not split (ep = 1 or no model-parallel state)."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_expert_model_parallel_group() \
        if parallel_state.get_expert_model_parallel_world_size() > 1 else None


def passes_in_step(n: int) -> int:
    """The most passes any rank of this rank's expert-parallel group runs (``n`` when ep = 1)."""
    group = _ep_group()
    if group is None:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def all_done(done: bool) -> bool:
    """Whether every rank of the expert-parallel group is done (``done`` itself when ep = 1)."""
    group = _ep_group()
    if group is None:
        return done
    t = torch.tensor([int(done)], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def sequence_parts(config) -> tuple[int, int]:
    """(context-parallel parts, TP parts) each sequence is split into before it reaches a router: cp, and tp under
    sequence parallelism (1 without it: every TP rank routes the whole sequence)."""
    return config.context_parallel_size, config.tensor_model_parallel_size if config.sequence_parallel else 1


@contextlib.contextmanager
def router_losses_scaled(model: torch.nn.Module, factor: float):
    """Multiply the load-balancing and z-loss coefficients by ``factor`` for the body (0: no router loss).

    Why training divides them by the step's tokens: megatron-core's per-token mode (``calculate_per_token_loss``)
    multiplies each micro-batch's router losses by its token count, expecting ``finalize_model_grads`` to divide
    every gradient by the step's tokens. megarl's losses carry their own normaliser and finalize gets no count, so
    the coefficients are divided instead: the router losses then enter the gradient as token-weighted means over
    the step (all micro-batches and data-parallel ranks) times their configured coefficients.

    Where a rank routes only part of each sequence (1/cp at context parallelism, 1/tp more under sequence
    parallelism) megatron-core multiplies by that part's token count, while the router loss it computes is the
    rank's share of the whole sequence's: ``factor`` is multiplied by the number of parts, so every layout
    weights the router losses as one rank with whole sequences does (tests/parallel/test_moe_parallel.py)."""
    config = unwrap(model).config
    if not getattr(config, "num_moe_experts", None):
        yield
        return
    cp, tp = sequence_parts(config)
    factor *= cp * tp
    aux, z = config.moe_aux_loss_coeff, config.moe_z_loss_coeff
    config.moe_aux_loss_coeff = aux * factor
    config.moe_z_loss_coeff = z * factor if z and factor else None
    try:
        yield
    finally:
        config.moe_aux_loss_coeff, config.moe_z_loss_coeff = aux, z


_padding = False  # inside a padding pass (forward_backward's lock-step filler): RouterStats does not count it


@contextlib.contextmanager
def padding_pass(model: torch.nn.Module):
    """A pass run only to keep the expert-parallel ranks in step: its router losses are off and its routing is not
    counted in the step's router metrics."""
    global _padding
    _padding = True
    try:
        with router_losses_scaled(model, 0.0):
            yield
    finally:
        _padding = False


class RouterStats:
    """Router metrics of the passes run inside ``with RouterStats(model) as stats`` (training: one step).

    - ``moe/load_imbalance``: per layer, the busiest expert's tokens over the mean expert's (1 = perfectly
      balanced; E/k = every token to the same k experts), counted over all data x context ranks; layer mean.
    - ``moe/dropped_fraction``: the share of token-to-expert assignments dropped by a capacity limit (0 dropless).
    - ``moe/load_balancing_loss``, ``moe/z_loss``: megatron-core's router losses without their coefficients,
      layer mean (present when their coefficients are > 0).
    Every rank gets the same values (reduced over data x context and pipeline ranks, and over tensor-parallel
    ranks under sequence parallelism, where each routes its slice of the sequence)."""

    def __init__(self, model: torch.nn.Module):
        gpt = unwrap(model)
        self.routers = [m for m in gpt.modules() if isinstance(m, TopKRouter)]
        self.layers, self.experts = gpt.config.num_layers, gpt.config.num_moe_experts or 0
        self.topk = gpt.config.moe_router_topk
        # under sequence parallelism each TP rank routes its own 1/tp of the tokens: counts are summed over TP too
        self.cp_split, self.tp_split = sequence_parts(gpt.config)
        self.load = torch.zeros(self.layers, self.experts, dtype=torch.float64)
        self.calls = torch.zeros(self.layers, dtype=torch.float64)
        self.assigned = torch.zeros(2, dtype=torch.float64)  # kept assignments, tokens routed
        self.hooks = []

    def _record(self, router, args, output) -> None:
        if _padding:
            return
        _, routing_map = output
        layer = router.layer_number - 1
        kept = routing_map.detach().sum(0).double().cpu()
        self.load[layer] += kept
        self.calls[layer] += 1
        self.assigned += torch.tensor([float(kept.sum()), float(routing_map.shape[0])], dtype=torch.float64)

    def __enter__(self) -> RouterStats:
        if self.routers:
            clear_aux_losses_tracker()
            self.hooks = [r.register_forward_hook(self._record) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()

    def metrics(self) -> dict[str, float]:
        if not self.routers:
            return {}
        tracker = get_moe_layer_wise_logging_tracker()
        names = sorted(n for n in tracker if n in ("load_balancing_loss", "z_loss"))
        losses = torch.stack([tracker[n]["values"].detach().double().cpu() for n in names]) if names else \
            torch.zeros(0, self.layers, dtype=torch.float64)
        dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        flat = torch.cat([self.load.flatten(), self.calls, self.assigned, losses.flatten()]).to(comm_device(dp_cp))
        if dist.get_world_size(dp_cp) > 1:
            dist.all_reduce(flat, group=dp_cp)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # each stage filled the rows of its own layers, and counted assignments in its own layers only
            dist.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
        if self.tp_split > 1:  # megatron-core's router losses are then each TP rank's share of the whole
            dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
        flat = flat.cpu()
        n_le, ranks = self.layers * self.experts, dist.get_world_size(dp_cp)
        load = flat[:n_le].view(self.layers, self.experts)
        calls = flat[n_le: n_le + self.layers] / (ranks * self.tp_split)  # passes per rank
        kept, routed = flat[n_le + self.layers: n_le + self.layers + 2]
        losses = flat[n_le + self.layers + 2:].view(len(names), self.layers)
        imbalance = load.max(1).values / load.mean(1).clamp_min(1e-12)
        out = {"moe/load_imbalance": float(imbalance.mean()),
               "moe/dropped_fraction": float(1.0 - kept / max(float(routed) * self.topk, 1.0))}
        # summed over passes and ranks. The context-parallel (and, under sequence parallelism, the TP) ranks of one
        # replica each hold part of its tokens: megatron-core's load-balancing loss is then each part's share of the
        # replica's loss (summed), its z-loss each part's mean (averaged); either way a mean per pass and replica
        parts = self.cp_split * self.tp_split
        for name, per_layer in zip(names, losses):
            per_replica = per_layer / (ranks // self.cp_split)
            out[f"moe/{name}"] = float((per_replica / (parts if name == "z_loss" else 1) / calls.clamp_min(1)).mean())
        return out

