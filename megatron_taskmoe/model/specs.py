"""megatron-core layer specs of the encoder and decoder: pre-norm Transformer layers, dense or MoE FFN.

All parts are megatron's (`TransformerLayer`, `SelfAttention`, `CrossAttention`, `MLP`, column/row-parallel linears,
`MoELayer`) except two that megatron has only in CUDA-bound or sequence-parallel-hostile forms: the core attention
(`attention.SDPAttention`, torch SDPA) and the norm (`norm.SequenceParallelNorm`). The decoder's attention modules
are megatron's with an incremental-decoding path (`attention.DecoderSelfAttention`/`DecoderCrossAttention`, which
use a `kv_cache.DecoderCache` passed as megatron's `inference_context`), and the parallel linears are megatron's with
a forward that skips their autograd bookkeeping when gradients are off (`linear.py`). MoE FFNs come from the routing
module's `get_moe_mlp_spec` (our router, dispatchers and adapters inside megatron's `MoELayer`).

A block spec lists its layers explicitly (`TransformerBlockSubmodules`), so the MoE placement per layer and the
pipeline split (a stage builds the slice of layers it owns) are decided here, not by megatron's GPT defaults.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import (
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_taskmoe.compat.moe import use_megatron_permute_fusion
from megatron_taskmoe.model.attention import DecoderCrossAttention, DecoderSelfAttention, SDPAttention
from megatron_taskmoe.model.config import ModelConfig
from megatron_taskmoe.model.linear import ColumnParallelLinear, RowParallelLinear
from megatron_taskmoe.model.moe import get_moe_mlp_spec
from megatron_taskmoe.model.norm import SequenceParallelNorm
from megatron_taskmoe.model.task_context import TaskContext
from megatron_taskmoe.ops.dispatcher import token_dispatcher_builder

SIDES = ("encoder", "decoder")


def dense_mlp_spec() -> ModuleSpec | functools.partial:
    """megatron's MLP on column/row-parallel linears (fc1 split by columns, fc2 by rows under TP).

    From megatron-core 0.18 `TransformerLayer` builds its mlp through `MLP.as_mlp_submodule` (a `ModuleSpec` of
    `MLP` still works there, rewrapped with a warning per layer); before 0.18 it takes the `ModuleSpec`."""
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if hasattr(MLP, "as_mlp_submodule"):
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)


def moe_mlp_spec(model: ModelConfig, side: str, task_context: TaskContext) -> ModuleSpec:
    """The MoE FFN of `side`: megatron's MoELayer with our router/adapters (routing module's spec).

    Token permutation: `MoEConfig.permute_backend` "auto"/"extension" use our dispatchers (ops/, the compiled
    kernels where built, the task-level fast path where the side routes by task or has one expert per token
    choice); "torch" keeps megatron-core's own dispatcher unchanged. On a GPU with Transformer Engine's fused
    permutation, "auto" takes megatron's dispatcher with that fusion instead (`compat.moe.
    use_megatron_permute_fusion`; `to_transformer_config` sets `moe_permute_fusion` to match)."""
    if model.moe is None:
        raise ValueError("moe_mlp_spec: ModelConfig.moe is None (a dense model has no MoE layers)")
    backend = model.moe.permute_backend
    uniform_routing_possible = (model.moe.side(side).mode == "task"
                                or model.moe.side_num_experts(side) == model.moe.topk)
    megatron_dispatcher = backend == "torch" or use_megatron_permute_fusion(backend)
    builder = None if megatron_dispatcher else token_dispatcher_builder(backend, fast_path=uniform_routing_possible)
    return get_moe_mlp_spec(moe_config=model.moe, side=side, task_context=task_context,
                            token_dispatcher_builder=builder)


def _self_attention(mask_type: AttnMaskType, module: type = SelfAttention) -> ModuleSpec:
    return ModuleSpec(
        module=module,
        params={"attn_mask_type": mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def encoder_layer_spec(mlp: ModuleSpec) -> ModuleSpec:
    """Pre-norm encoder layer: x + SelfAttn(LN(x)) (padding mask), then x + FFN(LN(x))."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelNorm,
            self_attention=_self_attention(AttnMaskType.padding),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_layer_spec(mlp: ModuleSpec) -> ModuleSpec:
    """Pre-norm decoder layer: causal self-attention, cross-attention over the encoder output, FFN (attention with
    an incremental-decoding path)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelNorm,
            self_attention=_self_attention(AttnMaskType.causal, DecoderSelfAttention),
            self_attn_bda=get_bias_dropout_add,
            pre_cross_attn_layernorm=SequenceParallelNorm,
            cross_attention=ModuleSpec(
                module=DecoderCrossAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=CrossAttentionSubmodules(
                    linear_q=ColumnParallelLinear,
                    linear_kv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            cross_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(
    model: ModelConfig,
    side: str,
    task_context: TaskContext,
    layers: Optional[Sequence[int]] = None,
    final_norm: bool = True,
) -> TransformerBlockSubmodules:
    """Spec of `side`'s block holding the 0-based layer indexes `layers` (all of the side by default).

    The final norm (pre-norm Transformers normalize the block output) is built only where the block ends, which
    megatron's block decides with its `post_process` flag; `final_norm=False` leaves it out entirely."""
    if side not in SIDES:
        raise ValueError(f"block_spec: side={side!r} must be one of {SIDES}")
    num = model.encoder_layers if side == "encoder" else model.decoder_layers
    layers = list(range(num)) if layers is None else list(layers)
    if any(not 0 <= i < num for i in layers):
        raise ValueError(f"block_spec: layer indexes {layers} are outside the {num} {side} layers")
    pattern = model.moe_pattern(side)
    make_layer = encoder_layer_spec if side == "encoder" else decoder_layer_spec
    specs = []
    for i in layers:
        mlp = moe_mlp_spec(model, side, task_context) if pattern[i] else dense_mlp_spec()
        specs.append(make_layer(mlp))
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=SequenceParallelNorm if final_norm else None)
