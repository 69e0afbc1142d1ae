"""Build a megatron-core GPTModel from a ModelArch, for the current TP/PP rank.

The Transformer Engine layer spec is used when TE imports and CUDA is present (fused kernels, FP8-ready);
otherwise megatron-core's local spec (pure torch modules), which is what runs on CPU. Both specs produce the same
function; their parameter names differ only in the fused layer norms (see ``weights.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                      get_gpt_layer_with_transformer_engine_spec)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megarl.backends.megatron.context_parallel import ContextParallelAttention
from megarl.backends.megatron.cpu_compat import enable_cpu_compat
from megarl.backends.megatron.packing import install_packed_rope
from megarl.backends.megatron.sequence_parallel import local_block_spec
from megarl.convert.arch import ModelArch, check_parallel
from megarl.kernels import te_available
from megarl.parallel import ParallelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_layer_spec_name() -> str:
    return "transformer_engine" if (te_available() and torch.cuda.is_available()) else "local"


RECOMPUTE = {  # model.recompute -> megatron-core's activation recomputation settings (training mode only)
    "none": {},
    "selective": dict(recompute_granularity="selective"),  # core attention's activations
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),  # every layer
}


def moe_config(arch: ModelArch, moe=None, grouped_gemm: bool = False) -> dict:
    """megatron-core's MoE settings for a mixture-of-experts ``arch`` ({} for a dense one). ``moe``: the run's
    ``MoESection`` (megarl.config; None = its defaults): dispatcher, router-loss coefficients, capacity.
    ``grouped_gemm``: the experts are TE's grouped GEMM (the TE layer spec), else one MLP per expert."""
    if not arch.is_moe:
        return {}
    from megarl.config import MoESection

    moe = moe or MoESection()
    if moe.dispatcher == "allgather" and parallel_state.get_expert_model_parallel_world_size() > 1 \
            and not torch.cuda.is_available():
        raise ValueError("moe.dispatcher=allgather at parallel.ep > 1 needs NCCL: gloo's all-gather takes only "
                         "equal sizes, and expert-parallel ranks route different numbers of tokens. Use "
                         "moe.dispatcher=alltoall on CPU.")
    aux = arch.moe_aux_loss_coef if moe.aux_loss_coef is None else moe.aux_loss_coef
    return dict(
        num_moe_experts=arch.num_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_top_k,
        # HF: softmax over all experts, top k, renormalised when norm_topk_prob. Megatron without pre-softmax takes
        # the top k logits then their softmax: the same weights. With pre-softmax: softmax, top k, no renorm.
        moe_router_pre_softmax=not arch.moe_norm_topk, moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none", moe_aux_loss_coeff=aux,
        moe_z_loss_coeff=moe.z_loss_coef or None, moe_token_dispatcher_type=moe.dispatcher,
        moe_expert_capacity_factor=moe.capacity_factor, moe_token_drop_policy="probs",
        moe_router_dtype="fp32",  # HF's routers take their softmax in fp32 too
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        moe_grouped_gemm=grouped_gemm, moe_permute_fusion=False,
    )


def transformer_config(arch: ModelArch, dtype: torch.dtype = torch.float32, init_weights: bool = True,
                       recompute: str = "none", moe=None, layer_spec: str = "local",
                       sequence_parallel: bool = False) -> TransformerConfig:
    """The TransformerConfig equal in function to the HF model, for the parallel layout now initialised.

    ``recompute`` trades compute for activation memory in training: "full" keeps only each layer's input and
    recomputes the layer in backward (about one more forward), "selective" recomputes core attention only.
    ``sequence_parallel``: activations outside the TP matmuls split over the TP ranks along the sequence
    (``sequence_parallel.py``); needs tp > 1.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"model.recompute='{recompute}' is unknown; use one of {', '.join(RECOMPUTE)}.")
    ParallelDims(parallel_state.get_tensor_model_parallel_world_size(), sp=sequence_parallel).check()
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(), sequence_parallel=sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        # fusions need apex/TE kernels; they are pure speed, never semantics
        use_cpu_initialization=not on_gpu, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, calculate_per_token_loss=True, **RECOMPUTE[recompute],
        **moe_config(arch, moe, grouped_gemm=layer_spec == "transformer_engine"),
        # init_weights=False keeps megatron-core's init path (it is where the TP attributes tensor_model_parallel /
        # partition_dim / partition_stride are set; with perform_initialization=False sharded weights have none,
        # the optimizer then counts only TP rank 0's shards in the grad norm) with init functions that do nothing
        **({} if init_weights else dict(init_method=_leave_uninitialised, output_layer_init_method=_leave_uninitialised,
                                        embedding_init_method=_leave_uninitialised)),
    )


def _bind_router_gemm() -> None:
    """megatron-core 0.16's router reads ``moe_utils.te_general_gemm``, a name bound only when Transformer Engine
    imports: without TE (the CPU, or a CUDA machine without it) None sends the router down its torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _leave_uninitialised(weight: torch.Tensor) -> None:
    """An init method for models whose weights are loaded next: random init of a large model takes minutes."""


def build_model(arch: ModelArch, *, dtype: torch.dtype = torch.float32, layer_spec: str | None = None,
                seq_length: int | None = None, init_weights: bool = True, recompute: str = "none",
                moe=None, sequence_parallel: bool = False) -> torch.nn.Module:
    """The GPTModel stage of this rank (wrapped in Float16Module for bf16/fp16). parallel_state must be set up.

    Weights are randomly initialised, or left uninitialised with ``init_weights=False`` (conversion, loading:
    skips minutes of random init on large models). Load real ones with ``weights.load_hf_weights``.
    ``recompute``: activation recomputation in training (see ``transformer_config``); ``moe``: the run's router
    and dispatcher settings for a mixture-of-experts model (``moe_config``); ``sequence_parallel``: see
    ``transformer_config``.
    """
    enable_cpu_compat()
    check_parallel(arch, parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size(),
                   ep=parallel_state.get_expert_model_parallel_world_size())
    if arch.is_moe:
        _bind_router_gemm()
    install_packed_rope()
    spec_name = layer_spec or default_layer_spec_name()
    if spec_name == "transformer_engine":
        if not te_available():
            raise ValueError("model.layer_spec=transformer_engine but Transformer Engine does not import; "
                             "install megarl[gpu] on a CUDA machine or set model.layer_spec=local.")
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=arch.num_experts or None,
                                                          moe_grouped_gemm=arch.is_moe, qk_layernorm=arch.qk_norm)
    elif spec_name == "local":
        # experts: SequentialMLP (one MLP per local expert; megatron-core's grouped GEMM needs TE or CUDA)
        spec = get_gpt_layer_local_spec(num_experts=arch.num_experts or None, moe_grouped_gemm=False,
                                        qk_layernorm=arch.qk_norm, normalization="RMSNorm")
        # megatron-core's local core attention takes neither packed sequences nor cp > 1; this subclass does both
        # (context_parallel.py, packing.py) and is the stock one otherwise
        spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    else:
        raise ValueError(f"model.layer_spec='{spec_name}' is unknown; use 'local' or 'transformer_engine'.")
    config = transformer_config(arch, dtype, init_weights, recompute, moe, spec_name, sequence_parallel)
    if spec_name == "local":  # torch norms that take sequence parallelism (megatron-core's refuse it)
        spec = local_block_spec(spec, config)
    model = GPTModel(
        config, spec, vocab_size=arch.padded_vocab_size,
        max_sequence_length=seq_length or arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True, share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope", rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None, rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    for name, param in model.named_parameters():
        if ".experts." in name:
            # megatron-core marks experts as expert-parallel only at ep > 1; marked at every ep, their gradients go
            # to the expert buffers (reduced over the expert-data-parallel ranks: at ep = 1 the data ranks, as
            # before) and their optimizer state to the expert optimizer, so a checkpoint has one optimizer layout
            # for every ep and resumes at another
            param.allreduce = False
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if dtype in (torch.bfloat16, torch.float16):
        model = Float16Module(config, model)
    model.megarl_arch = arch  # the padded vocab and the real vocab travel with the model
    return model


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside Float16Module / DDP wrappers."""
    while not isinstance(model, GPTModel):
        model = model.module
    return model
