"""Key/value cache of incremental decoding: what the decoder's attention layers keep between decoding steps.

megatron-core 0.16.1 has an inference context (`StaticInferenceContext`) whose attention layers keep a key/value
cache, but it does not fit an encoder-decoder on CPU: it allocates its buffers with `torch.cuda.current_device()`,
keys them by layer number only (a decoder layer's self-attention and cross-attention would write into one entry),
appends the cross-attention keys/values of the encoder output to that entry at every step instead of computing
them once, and reorders only same-size batches (`swap_key_value_dict`), so finished sentences cannot leave. This
cache is passed the same way, as the `inference_context` that megatron's `TransformerBlock` and `TransformerLayer`
hand to their attention modules; our decoder attention modules (`attention.DecoderSelfAttention`,
`attention.DecoderCrossAttention`) use it:

* self-attention: per layer, preallocated key and value buffers [B, Hkv, T_max, K, Dh] (this rank's heads), laid
  out for `ops.beam_attention`: a step writes hypothesis k's new position at [its sentence's slot, :, length, k]
  and nothing is moved afterwards. `ancestry_NT` (shared by the layers) says which beam index holds each row's
  earlier positions, and attention reads them through it (`ops.beam_attention.beam_decode_attention`, a C++
  kernel on CPU);
* cross-attention: per layer, the keys/values of the encoder output [L, Hkv, S, Dh], computed once per batch at
  the first step, and the source padding mask [L, S]. The K hypotheses of a sentence are consecutive rows, so a
  step attends with the K queries of a sentence against its one copy of the encoder keys (no copy per hypothesis);
* `reorder(parent_N, sentences_L)`: beam reordering (row n continues former row parent_N[n], a row of the same
  sentence) gathers the rows of the [N, length] ancestry table, not the keys and values; dropping the finished
  sentences also selects their slots, their rows of the cross-attention keys/values and of the source mask.

Legend: B batch (source sentences; the cache slots), L live sentences, K hypotheses per sentence, N = L*K rows,
S source length, T_max cache capacity (positions), Hkv key/value heads on this tensor-parallel rank, Dh head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.inference.contexts.base_context import BaseInferenceContext

from megatron_taskmoe.compat.inference_context import init_inference_context
from megatron_taskmoe.ops.beam_attention import BACKENDS, beam_cross_attention, beam_decode_attention


class DecoderCache(BaseInferenceContext):
    """One batch's decoding state in the attention layers of one model or pipeline stage (see the module
    docstring). `max_length` is the number of positions to hold (bos + the longest output)."""

    def __init__(self, *, beam_size: int, max_length: int, src_padding_mask_BS: torch.Tensor,
                 attention_backend: str = "auto") -> None:
        init_inference_context(self, materialize_only_last_token_logits=True)
        if beam_size < 1 or max_length < 1:
            raise ValueError(f"DecoderCache: beam_size={beam_size} and max_length={max_length} must be >= 1")
        if attention_backend not in BACKENDS:
            raise ValueError(f"DecoderCache: attention_backend must be one of {BACKENDS}, got {attention_backend!r}")
        self.beam_size = beam_size
        self.max_length = max_length
        self.length = 0
        """Positions cached per row (the next token's position)."""
        self.new_positions = 1
        """Real positions a step appends (a step may carry padding positions after them: sequence parallelism)."""
        self.slots = src_padding_mask_BS.shape[0]
        """Sentences the self-attention caches hold (the batch; finished sentences keep their slots)."""
        self.sources_L = torch.arange(self.slots, device=src_padding_mask_BS.device)
        """Batch index of each live sentence (its slot in the self-attention caches)."""
        self.source_mean_BD: Optional[torch.Tensor] = None
        """Per-sentence routing state of decoder layers that route by sentence (set by the model)."""
        self.src_padding_mask_LS = src_padding_mask_BS.bool()
        self.attention_backend = attention_backend
        """`ops.beam_attention` backend of the self- and cross-attention steps ("auto", "extension", "torch")."""
        self._self_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cross_allowed_LS: Optional[torch.Tensor] = None
        self._per_row: dict[str, torch.Tensor] = {}
        self.rows = self.slots * beam_size
        self._beam_N = torch.arange(self.rows, device=src_padding_mask_BS.device) % beam_size
        self.ancestry_NT = self._beam_N.unsqueeze(1).repeat(1, max_length)
        """Beam index of the slot holding each row's position p (columns from `length` on: the row's own)."""

    def row_sources(self) -> torch.Tensor:
        """Batch index of the source sentence of each row [N]."""
        return self.sources_L.repeat_interleave(self.beam_size)

    def per_row(self, name: str, values_BX: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """`values_BX` (one entry per batch sentence) gathered to the rows [N, ...]; kept until sentences leave
        (a beam reorder keeps every row in its sentence)."""
        if values_BX is None:
            return None
        if name not in self._per_row:
            self._per_row[name] = values_BX.index_select(0, self.row_sources())
        return self._per_row[name]

    # megatron's inference-context interface, as its layers query it
    def is_static_batching(self) -> bool:
        return True

    def is_decode_only(self) -> bool:
        return self.length > 0

    # ------------------------------------------------------------------------------------------------ steps
    def advance(self) -> None:
        """Called by the model after every layer has appended a step's positions."""
        self.length += self.new_positions

    def attend_self(self, layer: int, query_NHQD: torch.Tensor, key_NHqD: torch.Tensor, value_NHqD: torch.Tensor,
                    scale: float) -> torch.Tensor:
        """Write a step's keys/values [N, Hkv, q, Dh] (q = `new_positions`) at positions length.. of `layer`, and
        attend the step's queries [N, H, Q, Dh] over every cached position so far -> [N, H, Q, Dh]."""
        n, heads, q, dh = key_NHqD.shape
        if n != self.rows:
            raise ValueError(f"DecoderCache: a step of {n} rows, the cache holds {self.rows}")
        end = self.length + q
        if end > self.max_length:
            raise ValueError(f"DecoderCache: position {end} exceeds the {self.max_length} positions allocated")
        k = self.beam_size
        if layer not in self._self_kv:
            shape = (self.slots, heads, self.max_length, k, dh)
            self._self_kv[layer] = (key_NHqD.new_empty(shape), value_NHqD.new_empty(shape))
        key_cache, value_cache = self._self_kv[layer]
        for j in range(q):
            # [N, Hkv, Dh] -> [L, Hkv, K, Dh], into this position's beam slots of the live sentences
            for cache, new_NHqD in ((key_cache, key_NHqD), (value_cache, value_NHqD)):
                new_LHKD = new_NHqD[:, :, j].reshape(n // k, k, heads, dh).transpose(1, 2)
                cache[:, :, self.length + j].index_copy_(0, self.sources_L, new_LHKD)
        return beam_decode_attention(query_NHQD, key_cache, value_cache, self.sources_L, self.ancestry_NT, end,
                                     scale, backend=self.attention_backend)

    def cross(self, layer: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The encoder keys/values [L, Hkv, S, Dh] of `layer`, or None before its first step."""
        return self._cross_kv.get(layer)

    def set_cross(self, layer: int, key_LHSD: torch.Tensor, value_LHSD: torch.Tensor) -> None:
        self._cross_kv[layer] = (key_LHSD, value_LHSD)

    def cross_allowed(self) -> torch.Tensor:
        """Where cross-attention may look [L, S] (True at real source tokens; a source with none, which only
        padding rows have, is opened entirely, as `attention.allowed_mask` does)."""
        if self._cross_allowed_LS is None:
            allowed_LS = ~self.src_padding_mask_LS
            self._cross_allowed_LS = allowed_LS | ~allowed_LS.any(dim=-1, keepdim=True)
        return self._cross_allowed_LS

    def attend_cross(self, layer: int, query_LHXD: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of each live sentence's query rows [L, H, X, Dh] (its K hypotheses' step positions) over
        `layer`'s encoder keys/values at the sentence's real source positions -> [L, H, X, Dh]."""
        key_LHSD, value_LHSD = self._cross_kv[layer]
        return beam_cross_attention(query_LHXD, key_LHSD, value_LHSD, self.cross_allowed(), scale,
                                    backend=self.attention_backend)

    # ------------------------------------------------------------------------------------------------ beams
    def reorder(self, parent_N: torch.Tensor, sentences_L: Optional[torch.Tensor] = None) -> None:
        """Row n continues former row parent_N[n]; `sentences_L` (former live-sentence indexes) when sentences
        left the batch (then parent_N has K rows per remaining sentence)."""
        if sentences_L is not None:
            self.sources_L = self.sources_L.index_select(0, sentences_L)
            self.src_padding_mask_LS = self.src_padding_mask_LS.index_select(0, sentences_L)
            self._cross_allowed_LS = None
            self._per_row = {}
            for layer, (k, v) in self._cross_kv.items():
                self._cross_kv[layer] = (k.index_select(0, sentences_L), v.index_select(0, sentences_L))
        rows = parent_N.shape[0]
        # Beam search moves a hypothesis only within its sentence (the cache relies on it: a sentence's beams
        # share its slot).
        k = self.beam_size
        former_L = torch.arange(rows // k, device=parent_N.device) if sentences_L is None else sentences_L
        if rows % k or not torch.equal(parent_N.div(k, rounding_mode="floor"), former_L.repeat_interleave(k)):
            raise ValueError("DecoderCache.reorder: every row must continue a row of its own sentence (former "
                             f"sentence of each new row: {former_L.tolist()}, parents: {parent_N.tolist()})")
        self.ancestry_NT = self.ancestry_NT.index_select(0, parent_N)
        self.ancestry_NT[:, self.length :] = self._beam_N[:rows].unsqueeze(1)  # positions to come: the row's own
        self.rows = rows
