"""Core attention for megatron-core specs on torch's `scaled_dot_product_attention`.

Replaces megatron's `DotProductAttention` in our layer specs: same constructor and call signature (so megatron's
`SelfAttention`/`CrossAttention` build and call it unchanged), but no CUDA-only global memory buffer, no CUDA
causal-mask helper, and torch picks the best kernel for the device (flash/memory-efficient on GPU, fused math on
CPU). Tensor parallelism needs nothing special: megatron's column-parallel QKV projection already hands each rank
its own heads.

Masks follow megatron: a boolean `attention_mask` broadcastable to [B, heads, Sq, Sk], True where attention is NOT
allowed (padding keys). `attn_mask_type == causal` adds the causal constraint. Rows with every key masked (a batch
row that is all padding) are unmasked instead of producing NaN; their outputs belong to padding positions.

Legend: B batch, H heads on this tensor-parallel rank, Sq query length, Sk key length, Dh head dim.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


def allowed_mask(
    attention_mask: Optional[torch.Tensor], causal: bool, sq: int, sk: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Boolean mask, True where attention IS allowed (SDPA's convention), or None for "everything allowed".

    `attention_mask` is megatron's (True = masked), broadcastable to [B, H, Sq, Sk]. Causal alignment is to the
    end of the keys (query i sees keys up to i + Sk - Sq), which is plain causality when Sq == Sk."""
    allowed = None if attention_mask is None else ~attention_mask.bool()
    if causal:
        causal_QK = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
        allowed = causal_QK if allowed is None else allowed & causal_QK
    if allowed is not None:
        # A query with no allowed key would give NaN; let it attend everywhere instead (it is padding).
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed


class SDPAttention(MegatronModule):
    """megatron-core core attention on `torch.nn.functional.scaled_dot_product_attention`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism (context_parallel_size must be 1)")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not support apply_query_key_layer_scaling")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_query_groups = divide(config.num_query_groups, tp_size)
        head_dim = config.kv_channels
        self.hidden_size_per_partition = self.num_heads * head_dim
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query [Sq, B, H, Dh], key/value [Sk, B, Hkv, Dh] -> context [Sq, B, H*Dh]."""
        if packed_seq_params is not None:
            raise ValueError("SDPAttention does not support packed sequences")
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        q_BHQD = query.permute(1, 2, 0, 3)
        k_BHKD = key.permute(1, 2, 0, 3)
        v_BHKD = value.permute(1, 2, 0, 3)
        if self.num_heads != self.num_query_groups:
            repeat = self.num_heads // self.num_query_groups
            k_BHKD = k_BHKD.repeat_interleave(repeat, dim=1)
            v_BHKD = v_BHKD.repeat_interleave(repeat, dim=1)
        causal = mask_type == AttnMaskType.causal
        allowed = allowed_mask(attention_mask, causal, sq, sk, query.device)
        dropout_p = self.dropout_p if self.training else 0.0
        # As megatron: outside sequence parallelism, attention dropout differs per tensor-parallel rank.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout_p > 0 and not self.config.sequence_parallel
            else nullcontext()
        )
        with rng:
            ctx_BHQD = F.scaled_dot_product_attention(
                q_BHQD, k_BHKD, v_BHKD, attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale
            )
        return ctx_BHQD.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
