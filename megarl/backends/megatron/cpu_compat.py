"""Run megatron-core 0.16 on machines without CUDA (gloo, local layer spec). A no-op wherever CUDA exists.

megatron-core hard-codes the GPU in ~150 places. Rather than fork any of its code we redirect, once per
process and only when ``torch.cuda.is_available()`` is False, the kinds of call that fail on CPU:

1. **Device arguments.** ``device="cuda"``, ``device=torch.cuda.current_device()`` (an int), ``.cuda()``,
   ``.to("cuda")`` and ``pin_memory=True`` inside factory functions, RoPE, the causal-mask builders,
   ``GlobalMemoryBuffer.get_tensor``, the pipeline schedules and p2p shape exchange. A
   ``torch.overrides.TorchFunctionMode`` rewrites them to the CPU. Without CUDA any such call would raise, so
   rewriting can never change a working program.
2. **CUDA runtime queries.** ``torch.cuda.current_device`` returns 0 (then rewritten by 1) and
   ``torch.cuda.synchronize`` does nothing: there is no device to wait for.
3. **The RNG tracker.** Megatron forks named CUDA generator states for tensor-parallel init and dropout. Here
   the "device" generator is the CPU default generator: ``_get/_set_cuda_rng_state`` read and write it, and
   ``CPURNGStatesTracker`` seeds and forks named CPU states (so recompute and dropout stay reproducible).
4. **Type-string checks.** The optimizer and grad clipping test ``param.type() == 'torch.cuda.FloatTensor'``.
   Calls to ``Tensor.type()`` with no argument *made from megatron.core* get the CUDA spelling; every other
   caller sees the true type.
5. **Seeding.** ``torch.cuda.manual_seed`` seeds the CPU generator, which plays the device generator.
6. **Mixture of experts.** The alltoall dispatcher copies token counts to the host
   on a side ``torch.cuda.Stream`` (on the CPU they are host tensors already: only the numpy conversion of the
   split sizes is kept); and
   the backward of the EP all-to-all / all-gather asks ``torch.cuda.current_device()`` inside autograd's engine,
   where the mode is off: every backward pass runs with the mode pushed again.
7. **Uneven gathers.** At tp > 1 with ep > 1 the alltoall dispatcher gathers and reduce-scatters a different
   number of tokens per TP rank; gloo's all-gather and reduce-scatter take equal sizes only. Those two calls pad
   to the largest part and gather (the reduce-scatter: an all-reduce, then this rank's part) -- the same result.

The mode is pushed on the calling thread (autograd runs CPU backward on that thread). A mode is switched off
while its own handler runs, and ``backward`` goes through the handler, so the backward of Megatron's activation
checkpointing (which re-runs whole layers) pushes a mode of its own. Threads started later do not inherit it;
megarl does Megatron work on the main thread only.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_mode: _CudaToCpuMode | None = None


def _cpu_device(device):
    """Map any CUDA device spelling (including a bare int index) to the CPU; leave others alone."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _is_device_like(x) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, str) and x.startswith("cuda")) or \
        (isinstance(x, torch.device) and x.type == "cuda")


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU (module docstring, items 1 and 4)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs a CUDA host allocator
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.to and len(args) > 1 and _is_device_like(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            return _CUDA_TYPE_NAMES.get(name, name) if caller.startswith("megatron.core") else name
        return func(*args, **kwargs)


def _patch_rng() -> None:
    """Item 3: the CPU generator plays the CUDA default generator; named states are CPU states."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's tracker with named CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.default_generator.manual_seed(int(seed))
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Megatron's fork warns when the CPU state moves inside the fork; here the CPU generator IS the
            # forked one, so it always moves. Same bookkeeping, without the warning.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_name, orig_state = self._current_state_name, torch.get_rng_state()
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker = CPURNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_checkpointing() -> None:
    """Megatron's activation checkpointing re-runs a layer's forward inside autograd's backward, where the mode
    installed by ``enable_cpu_compat`` is switched off (module docstring): its backward pushes a mode of its own."""
    from megatron.core.tensor_parallel import random as mrandom

    def with_mode(backward):
        def run(ctx, *grads):
            with _CudaToCpuMode():
                return backward(ctx, *grads)
        return run

    for fn in (mrandom.CheckpointFunction, mrandom.CheckpointWithoutOutputFunction):
        fn.backward = staticmethod(with_mode(fn.backward))


def _patch_moe() -> None:
    """Item 6: the MoE sites (and autograd's engine, for the backward of the EP collectives). The router's missing
    ``te_general_gemm`` without Transformer Engine is not CPU-specific: ``model.build_model`` binds it."""
    import torch.autograd.graph as graph
    from megatron.core.transformer.moe import token_dispatcher

    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    dispatcher.cuda_dtoh_stream = "cpu"  # its __init__ makes a torch.cuda.Stream only while this is None

    def host_splits(self, point, tokens_per_expert=None):
        """What the CUDA version leaves behind, without a stream: the split sizes as numpy arrays (collectives
        take sequences of ints), the token counts as host tensors (they are)."""
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name, None)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    dispatcher._maybe_dtoh_and_synchronize = host_splits
    run_backward = graph._engine_run_backward

    def engine_run_backward(*args, **kwargs):
        with _CudaToCpuMode():
            return run_backward(*args, **kwargs)

    graph._engine_run_backward = torch.autograd._engine_run_backward = engine_run_backward


def _patch_uneven_collectives() -> None:
    """Item 7: megatron-core's first-dimension gather / reduce-scatter with per-rank sizes, in equal-size gloo calls."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        most = max(output_split_sizes)
        padded = input_.new_zeros((most, *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        out = input_.new_empty((most * group.size(), *input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded, group=group)
        return torch.cat([out[r * most: r * most + n] for r, n in enumerate(output_split_sizes)])

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[:group.rank()])
        return total[start: start + input_split_sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven


def enable_cpu_compat() -> bool:
    """Install the redirections if CUDA is absent. Idempotent. Returns True when they are active."""
    global _mode
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    # not torch.manual_seed: it calls torch.cuda.manual_seed_all itself
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    _patch_rng()
    _patch_checkpointing()
    _patch_moe()
    _patch_uneven_collectives()
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    return True


def cpu_compat_active() -> bool:
    return _mode is not None
