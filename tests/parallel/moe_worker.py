"""What the MoE gradient workers (worker_moe_grads.py, worker_moe_lockstep.py) share: the tiny Qwen3-MoE with both
router losses on, built at the launched layout inside Megatron DDP, and its gradients exported under HF names."""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist


def tiny_moe_ddp(**build_kwargs):
    """(arch, model, ddp): the tiny Qwen3-MoE (load-balancing loss 0.05, z-loss 0.01) at the current parallel
    layout, its weights written once per node, wrapped in Megatron DDP in training mode with zeroed gradients."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megarl.backends.megatron.model import build_model, unwrap
    from megarl.config import MoESection
    from megarl.convert.arch import read_arch_dir
    from megarl.convert.bundled import resolve_model_spec
    from megarl.trainer.build import load_weights_into, once_per_node_then_all

    box = [tempfile.mkdtemp(prefix="megarl-moe-worker-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box)
    hf_dir = once_per_node_then_all(lambda: resolve_model_spec("tiny:qwen3_moe", box[0], 1))
    arch = read_arch_dir(hf_dir)
    model = build_model(arch, init_weights=False, moe=MoESection(aux_loss_coef=0.05, z_loss_coef=0.01),
                        **build_kwargs)
    load_weights_into(model, arch, hf_dir)
    ddp = DistributedDataParallel(unwrap(model).config, DistributedDataParallelConfig(), model)
    ddp.train()
    ddp.zero_grad_buffer()
    return arch, model, ddp


def exported_gradients(model, arch) -> dict[str, torch.Tensor]:
    """This stage's summed gradients (after ``finalize_model_grads``) under HF names, gathered as the weights'
    export gathers them (TP shards, experts over EP). Overwrites the weights."""
    from megarl.backends.megatron.model import unwrap
    from megarl.backends.megatron.weights import export_stage_hf

    for p in unwrap(model).parameters():
        p.data = p.main_grad.detach().clone()
    return dict(export_stage_hf(model, arch))
