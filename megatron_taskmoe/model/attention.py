"""Core attention for megatron-core specs on torch's `scaled_dot_product_attention`.

Replaces megatron's `DotProductAttention` in our layer specs: same constructor and call signature (so megatron's
`SelfAttention`/`CrossAttention` build and call it unchanged), but no CUDA-only global memory buffer, no CUDA
causal-mask helper, and torch picks the best kernel for the device (flash/memory-efficient on GPU, fused math on
CPU). Tensor parallelism needs nothing special: megatron's column-parallel QKV projection already hands each rank
its own heads.

Masks follow megatron: a boolean `attention_mask` broadcastable to [B, heads, Sq, Sk], True where attention is NOT
allowed (padding keys). `attn_mask_type == causal` adds the causal constraint. Rows with every key masked (a batch
row that is all padding) are unmasked instead of producing NaN; their outputs belong to padding positions.

The decoder's attention modules, `DecoderSelfAttention` and `DecoderCrossAttention`, are megatron's `SelfAttention`
and `CrossAttention` (same submodules and weights, same forward when no cache is given) with an incremental path
for decoding: given a `kv_cache.DecoderCache` as megatron's `inference_context`, self-attention appends the step's
keys/values to the cache and attends over all cached positions (through the beam ancestry: the cache is never
reordered, `ops.beam_attention`); cross-attention projects the encoder output to
keys/values once per batch (first step) and attends the K hypotheses of a sentence, as K queries, to its one copy
(`ops.beam_attention.beam_cross_attention`).
Under sequence parallelism a step holds one real position and TP - 1 padding positions (so that it splits over
the ranks); only the real one is cached.

Legend: B batch, H heads on this tensor-parallel rank, Sq query length, Sk key length, Dh head dim; in decoding
N hypothesis rows, L sentences, K hypotheses per sentence (N = L*K), q step positions, t cached positions.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import CrossAttention, SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_taskmoe.model.kv_cache import DecoderCache


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


# ---------------------------------------------------------------------------------------------- decoding
def _cache_of(inference_context, module: str, training: bool) -> Optional[DecoderCache]:
    if inference_context is None:
        return None
    if training:
        raise RuntimeError(f"{module}: incremental decoding runs in eval mode (call model.eval())")
    if not isinstance(inference_context, DecoderCache):
        raise ValueError(f"{module}: the inference context must be a kv_cache.DecoderCache, got "
                         f"{type(inference_context).__name__} (megatron's own KV cache does not fit this model)")
    return inference_context


class DecoderSelfAttention(SelfAttention):
    """megatron's causal `SelfAttention`, plus a step with a key/value cache (module docstring)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                key_value_states: Optional[torch.Tensor] = None, inference_context=None, **kwargs):
        cache = _cache_of(inference_context, "DecoderSelfAttention", self.training)
        if cache is None:
            return super().forward(hidden_states, attention_mask, key_value_states=key_value_states, **kwargs)
        query_NHQD, key_NHQD, value_NHQD = self._step_qkv(hidden_states)
        new = cache.new_positions
        core = self.core_attention
        ctx_NHQD = cache.attend_self(self.layer_number, query_NHQD, key_NHQD[:, :, :new], value_NHQD[:, :, :new],
                                     scale=core.softmax_scale)
        n, _, q, _ = query_NHQD.shape
        return self.linear_proj(ctx_NHQD.permute(2, 0, 1, 3).reshape(q, n, core.hidden_size_per_partition))

    def _step_qkv(self, hidden_QND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query [N, H, q, Dh] and key/value [N, Hkv, q, Dh] of a step: the fused projection split as megatron's
        `get_query_key_value_tensors` splits it ([.., groups, (heads per group + 2) * Dh]) without its per-call
        bookkeeping; megatron's own is called where it does more (key/value groups fewer than the tensor-parallel
        ranks, query/key norms)."""
        has_qk_norm = any(norm is not None and not isinstance(norm, IdentityOp)
                          for norm in (self.q_layernorm, self.k_layernorm))
        if self.config.num_query_groups < self.world_size or has_qk_norm:
            query, key, value = self.get_query_key_value_tensors(hidden_QND, None)
            return query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
        mixed, _ = self.linear_qkv(hidden_QND)
        q, n = mixed.shape[:2]
        groups, dh = self.num_query_groups_per_partition, self.hidden_size_per_attention_head
        per_group = self.num_attention_heads_per_partition // groups
        mixed_NGQX = mixed.view(q, n, groups, (per_group + 2) * dh).permute(1, 2, 0, 3)
        query, key, value = mixed_NGQX.split([per_group * dh, dh, dh], dim=-1)
        query_NHQD = query.reshape(n, groups, q, per_group, dh).transpose(2, 3).reshape(n, groups * per_group, q, dh)
        return query_NHQD, key, value


class DecoderCrossAttention(CrossAttention):
    """megatron's `CrossAttention`, plus a step with the encoder keys/values cached (module docstring)."""

    def _encoder_keys_values(self, key_value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, S, Dh] of the encoder output [S(/TP), B, D] (megatron's projection)."""
        mixed_kv, _ = self.linear_kv(key_value_states)
        mixed_kv = mixed_kv.view(*mixed_kv.shape[:-1], self.num_attention_heads_per_partition,
                                 2 * self.hidden_size_per_attention_head)
        key, value = tensor_parallel.split_tensor_along_last_dim(mixed_kv, 2)
        return key.permute(1, 2, 0, 3).contiguous(), value.permute(1, 2, 0, 3).contiguous()

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                key_value_states: Optional[torch.Tensor] = None, inference_context=None, **kwargs):
        cache = _cache_of(inference_context, "DecoderCrossAttention", self.training)
        if cache is None:
            return super().forward(hidden_states, attention_mask, key_value_states=key_value_states, **kwargs)
        if cache.cross(self.layer_number) is None:
            if key_value_states is None:
                raise ValueError("DecoderCrossAttention: the first decoding step needs the encoder output")
            cache.set_cross(self.layer_number, *self._encoder_keys_values(key_value_states))
        query, _ = self.linear_q(hidden_states)  # [q, N, H*Dh]
        q, n = query.shape[:2]
        heads, dh, k = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head, cache.beam_size
        rows = n // k
        # The K hypotheses of a sentence attend to its keys together: [L, H, K*q, Dh].
        q_LHXD = query.view(q, rows, k, heads, dh).permute(1, 3, 2, 0, 4).reshape(rows, heads, k * q, dh)
        ctx_LHXD = cache.attend_cross(self.layer_number, q_LHXD, self.core_attention.softmax_scale)
        ctx_QND = ctx_LHXD.view(rows, heads, k, q, dh).permute(3, 0, 2, 1, 4).reshape(q, n, heads * dh)
        return self.linear_proj(ctx_QND)
