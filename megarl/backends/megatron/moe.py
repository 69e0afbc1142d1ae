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
from megatron.core.transformer.moe import router as router_module
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


def padding_kwargs(model: torch.nn.Module, padding: torch.Tensor | None) -> dict:
    """GPTModel.forward's ``padding_mask`` for a MoE model ({} for a dense one, or without ``padding``): [b, s] bool,
    True at padding, whose tokens megatron-core's router then leaves out of its losses (they are still routed: the
    experts' work keeps its shape). Under sequence parallelism megatron-core scatters the mask over the TP ranks on
    the first pipeline stage only; a later stage gets its rank's part here."""
    gpt = unwrap(model)
    if padding is None or not getattr(gpt.config, "num_moe_experts", None):
        return {}
    if gpt.config.sequence_parallel and not gpt.pre_process:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        padding = padding.chunk(tp, dim=1)[parallel_state.get_tensor_model_parallel_rank()]
    return {"padding_mask": padding}


def _count_evenly(routing_map, reduce_group, topk=None, with_padding_mask=False):
    """megatron-core 0.16's ``get_tokens_per_expert_and_token_count`` for the load-balancing loss, except that with a
    padding mask each rank holding part of the sequences (context parallelism, sequence parallelism) counts an
    equal part of their real tokens, not its own. The loss a rank computes is its share of the whole loss, which
    megatron-core multiplies by this count: with the rank's own count, ranks whose parts hold more padding would
    weigh less, and the gradient would depend on the layout (tests/parallel/test_moe_parallel.py)."""
    per_expert, local, total = _STOCK_COUNT[0](routing_map, reduce_group, topk=topk,
                                               with_padding_mask=with_padding_mask)
    if with_padding_mask:
        local = total / reduce_group.size()
    return per_expert, local, total


_STOCK_COUNT: list = []


@contextlib.contextmanager
def router_losses_scaled(model: torch.nn.Module, factor: float):
    """Multiply the load-balancing and z-loss coefficients by ``factor`` for the body (0: no router loss).

    Why training divides them by the step's real tokens: megatron-core's per-token mode
    (``calculate_per_token_loss``) multiplies each micro-batch's router losses by its token count (its real
    tokens when the pass has a padding mask, ``padding_kwargs``), expecting ``finalize_model_grads`` to divide every
    gradient by the step's tokens. megarl's losses carry their own normaliser and finalize gets no count, so the
    coefficients are divided instead: the router losses then enter the gradient as token-weighted means over the
    step's real tokens (all micro-batches and data-parallel ranks) times their configured coefficients.

    Where a rank routes only part of each sequence (1/cp at context parallelism, 1/tp more under sequence
    parallelism) megatron-core multiplies by that part's token count, while the router loss it computes is the
    rank's share of the whole sequence's (the z-loss: the mean over its part, times 1/parts): ``factor`` is
    multiplied by the number of parts, and ``_count_evenly`` gives every part an equal count for the
    load-balancing loss, so every layout weighs the router losses as one rank with whole sequences does
    (tests/parallel/test_moe_parallel.py)."""
    config = unwrap(model).config
    if not getattr(config, "num_moe_experts", None):
        yield
        return
    if not _STOCK_COUNT:  # once per process; megarl configures only the "aux_loss" load-balancing type
        _STOCK_COUNT.append(router_module.get_tokens_per_expert_and_token_count)
        router_module.get_tokens_per_expert_and_token_count = _count_evenly
    cp, tp = sequence_parts(config)
    factor *= cp * tp
    aux, z = config.moe_aux_loss_coeff, config.moe_z_loss_coeff
    config.moe_aux_loss_coeff = aux * factor
    config.moe_z_loss_coeff = z * factor if z and factor else None
    try:
        yield
    finally:
        config.moe_aux_loss_coeff, config.moe_z_loss_coeff = aux, z


_padding = False  # the pass running now (its forward, or its backward) is a lock-step padding pass
_saved: list = []  # the router-loss coefficients a padding pass switched off


def set_padding_pass(model: torch.nn.Module, on: bool) -> None:
    """Switch between a real pass and a padding pass (``forward.forward_backward``'s lock-step filler), whose router
    losses are off and whose routing the router metrics do not count. Called when a pass's forward starts and,
    through ``mark_pass``, when its backward starts: under ``model.recompute=full`` each layer runs again in the
    backward and reads the router-loss coefficients then, and a pipeline schedule interleaves the passes' forwards
    and backwards. Without that, a padding pass recomputed its router losses into the gradient
    (tests/parallel/test_moe_parallel.py)."""
    global _padding
    config = unwrap(model).config
    if on == _padding or not getattr(config, "num_moe_experts", None):
        return
    if on:
        _saved[:] = [config.moe_aux_loss_coeff, config.moe_z_loss_coeff]
        config.moe_aux_loss_coeff, config.moe_z_loss_coeff = 0.0, None
    else:
        config.moe_aux_loss_coeff, config.moe_z_loss_coeff = _saved
    _padding = on


def mark_pass(model: torch.nn.Module, output: torch.Tensor, padding: bool) -> torch.Tensor:
    """``output`` (a pass's output on this pipeline stage), hooked so that the pass's backward starts with
    ``set_padding_pass(model, padding)`` (a MoE model in training only)."""
    if output.requires_grad and getattr(unwrap(model).config, "num_moe_experts", None):
        output.register_hook(lambda grad: set_padding_pass(model, padding))
    return output


class RouterStats:
    """Router metrics of the training passes run inside ``with RouterStats(model) as stats`` (one step), over their
    real tokens (a pass's padding mask, ``padding_kwargs``, leaves the rest out).

    - ``moe/load_imbalance``: per layer, the busiest expert's tokens over the mean expert's (1 = perfectly
      balanced; E/k = every token to the same k experts), counted over all data x context ranks; layer mean.
    - ``moe/dropped_fraction``: the share of token-to-expert assignments dropped by a capacity limit (0 dropless).
    - ``moe/load_balancing_loss``: megatron-core's load-balancing loss without its coefficient, per pass and
      replica, averaged over them; layer mean (present when its coefficient is > 0).
    - ``moe/z_loss``: the z-loss without its coefficient, logsumexp(router logits)^2 averaged over the step's real
      tokens; layer mean (present when its coefficient is > 0).
    Every rank gets the same values (reduced over data x context and pipeline ranks, and over tensor-parallel
    ranks under sequence parallelism, where each routes its slice of the sequence). Only passes with gradients
    count: under ``model.recompute=full`` a layer's first forward runs without them and again in the backward,
    where megatron-core computes the router losses."""

    def __init__(self, model: torch.nn.Module):
        gpt = unwrap(model)
        self.routers = [m for m in gpt.modules() if isinstance(m, TopKRouter)]
        self.layers, self.experts = gpt.config.num_layers, gpt.config.num_moe_experts or 0
        self.topk = gpt.config.moe_router_topk
        self.has_lb = (getattr(gpt.config, "moe_aux_loss_coeff", 0) or 0) > 0  # megarl's load balancing: "aux_loss"
        self.has_z = bool(getattr(gpt.config, "moe_z_loss_coeff", None))
        # under sequence parallelism each TP rank routes its own 1/tp of the tokens: counts are summed over TP too
        self.cp_split, self.tp_split = sequence_parts(gpt.config)
        self.load = torch.zeros(self.layers, self.experts, dtype=torch.float64)
        self.calls = torch.zeros(self.layers, dtype=torch.float64)
        self.assigned = torch.zeros(2, dtype=torch.float64)  # kept assignments, tokens routed
        self.z = torch.zeros(2, self.layers, dtype=torch.float64)  # per layer: sum of z-loss x tokens, tokens
        self._z_before = {}
        self.hooks = []

    @staticmethod
    def _counted() -> bool:
        return not _padding and torch.is_grad_enabled()

    @staticmethod
    def _tracked_z(router) -> torch.Tensor | None:
        entry = get_moe_layer_wise_logging_tracker().get("z_loss")
        return None if entry is None else entry["values"][router.layer_number - 1].detach().clone()

    def _before(self, router, args) -> None:
        if self._counted() and self.has_z:
            self._z_before[router] = self._tracked_z(router)

    def _record(self, router, args, output) -> None:
        if not self._counted():
            return
        _, routing_map = output
        layer = router.layer_number - 1
        mask = args[1] if len(args) > 1 else None  # MoELayer calls router(hidden_states, padding_mask)
        if mask is not None:
            routing_map = routing_map[~mask.reshape(-1)]
        kept, tokens = routing_map.detach().sum(0).double().cpu(), float(routing_map.shape[0])
        self.load[layer] += kept
        self.calls[layer] += 1
        self.assigned += torch.tensor([float(kept.sum()), tokens], dtype=torch.float64)
        if self.has_z:  # this pass's z-loss is what it added to megatron-core's tracker: the mean over its tokens
            after, before = self._tracked_z(router), self._z_before.pop(router, None)
            if after is not None:
                z = float(after - before) if before is not None else float(after)
                self.z[:, layer] += torch.tensor([z * tokens, tokens], dtype=torch.float64)

    def __enter__(self) -> RouterStats:
        if self.routers:
            clear_aux_losses_tracker()
            self.hooks = [h for r in self.routers for h in (r.register_forward_pre_hook(self._before),
                                                             r.register_forward_hook(self._record))]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()

    def metrics(self) -> dict[str, float]:
        if not self.routers:
            return {}
        entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        lb = torch.zeros(self.layers, dtype=torch.float64) if entry is None else \
            entry["values"].detach().double().cpu()
        dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        flat = torch.cat([self.load.flatten(), self.calls, self.assigned, self.z.flatten(), lb]).to(comm_device(dp_cp))
        if dist.get_world_size(dp_cp) > 1:
            dist.all_reduce(flat, group=dp_cp)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # each stage filled the rows of its own layers, and counted assignments in its own layers only
            dist.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
        if self.tp_split > 1:  # each TP rank routed its slice of the tokens
            dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
        load, calls, assigned, z, lb = flat.cpu().split([self.layers * self.experts, self.layers, 2,
                                                         2 * self.layers, self.layers])
        calls = calls / (dist.get_world_size(dp_cp) * self.tp_split)  # passes per rank
        load, z = load.view(self.layers, self.experts), z.view(2, self.layers)
        imbalance = load.max(1).values / load.mean(1).clamp_min(1e-12)
        out = {"moe/load_imbalance": float(imbalance.mean()),
               "moe/dropped_fraction": float(1.0 - assigned[0] / max(float(assigned[1]) * self.topk, 1.0))}
        if self.has_lb:
            # summed over passes and ranks; the context-parallel (and, under sequence parallelism, the TP) ranks of
            # one replica each hold part of its tokens, and megatron-core's loss is then each part's share (summed)
            replicas = dist.get_world_size(dp_cp) // self.cp_split
            out["moe/load_balancing_loss"] = float((lb / replicas / calls.clamp_min(1)).mean())
        if self.has_z:
            out["moe/z_loss"] = float((z[0] / z[1].clamp_min(1)).mean())
        return out
