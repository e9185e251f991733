"""Key/value cache of incremental decoding: what the decoder's attention layers keep between decoding steps.

megatron-core 0.16.1 has an inference context (`StaticInferenceContext`) whose attention layers keep a key/value
cache, but it does not fit an encoder-decoder on CPU: it allocates its buffers with `torch.cuda.current_device()`,
keys them by layer number only (a decoder layer's self-attention and cross-attention would write into one entry),
appends the cross-attention keys/values of the encoder output to that entry at every step instead of computing
them once, and reorders only same-size batches (`swap_key_value_dict`), so finished sentences cannot leave. This
cache is passed the same way, as the `inference_context` that megatron's `TransformerBlock` and `TransformerLayer`
hand to their attention modules; our decoder attention modules (`attention.DecoderSelfAttention`,
`attention.DecoderCrossAttention`) use it:

* self-attention: per layer, preallocated key and value buffers [N, Hkv, T_max, Dh] (this rank's heads); a step
  writes the new position's keys/values at `length` and attends over the first `length + 1`;
* cross-attention: per layer, the keys/values of the encoder output [L, Hkv, S, Dh], computed once per batch at
  the first step, and the source padding mask [L, S]. The K hypotheses of a sentence are consecutive rows, so a
  step attends with the K queries of a sentence against its one copy of the encoder keys (no copy per hypothesis);
* `reorder(parent_N, sentences_L)`: beam reordering (row n continues former row parent_N[n]) copies the cached
  positions of the self-attention buffers into spare ones (one gather per tensor and layer, no allocation while the
  size holds); dropping the finished sentences also selects their rows of the cross-attention keys/values and of
  the source mask.

Legend: B batch (source sentences), L live sentences, K hypotheses per sentence, N = L*K rows, S source length,
T_max cache capacity (positions), Hkv key/value heads on this tensor-parallel rank, Dh head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.inference.contexts.base_context import BaseInferenceContext

from megatron_taskmoe.compat.inference_context import init_inference_context


class DecoderCache(BaseInferenceContext):
    """One batch's decoding state in the attention layers of one model or pipeline stage (see the module
    docstring). `max_length` is the number of positions to hold (bos + the longest output)."""

    def __init__(self, *, beam_size: int, max_length: int, src_padding_mask_BS: torch.Tensor) -> None:
        init_inference_context(self, materialize_only_last_token_logits=True)
        if beam_size < 1 or max_length < 1:
            raise ValueError(f"DecoderCache: beam_size={beam_size} and max_length={max_length} must be >= 1")
        self.beam_size = beam_size
        self.max_length = max_length
        self.length = 0
        """Positions cached per row (the next token's position)."""
        self.new_positions = 1
        """Real positions a step appends (a step may carry padding positions after them: sequence parallelism)."""
        self.sources_L = torch.arange(src_padding_mask_BS.shape[0], device=src_padding_mask_BS.device)
        """Batch index of each live sentence."""
        self.source_mean_BD: Optional[torch.Tensor] = None
        """Per-sentence routing state of decoder layers that route by sentence (set by the model)."""
        self.src_padding_mask_LS = src_padding_mask_BS.bool()
        self._self_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._spare: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cross_allowed_L11S: Optional[torch.Tensor] = None
        self._per_row: dict[str, torch.Tensor] = {}
        self.rows = src_padding_mask_BS.shape[0] * beam_size

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

    def append_self(self, layer: int, key_NHQD: torch.Tensor, value_NHQD: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a step's keys/values [N, Hkv, q, Dh] at positions length.. of `layer`; the keys and values of
        every cached position so far, views [N, Hkv, length + q, Dh]."""
        n, heads, q, dh = key_NHQD.shape
        if n != self.rows:
            raise ValueError(f"DecoderCache: a step of {n} rows, the cache holds {self.rows}")
        end = self.length + q
        if end > self.max_length:
            raise ValueError(f"DecoderCache: position {end} exceeds the {self.max_length} positions allocated")
        if layer not in self._self_kv:
            shape = (n, heads, self.max_length, dh)
            self._self_kv[layer] = (key_NHQD.new_empty(shape), value_NHQD.new_empty(shape))
        key_buf, value_buf = self._self_kv[layer]
        key_buf[:, :, self.length : end] = key_NHQD
        value_buf[:, :, self.length : end] = value_NHQD
        return key_buf[:, :, :end], value_buf[:, :, :end]

    def cross(self, layer: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The encoder keys/values [L, Hkv, S, Dh] of `layer`, or None before its first step."""
        return self._cross_kv.get(layer)

    def set_cross(self, layer: int, key_LHSD: torch.Tensor, value_LHSD: torch.Tensor) -> None:
        self._cross_kv[layer] = (key_LHSD, value_LHSD)

    def cross_allowed(self) -> torch.Tensor:
        """Where cross-attention may look [L, 1, 1, S] (True at real source tokens; a source with none, which only
        padding rows have, is opened entirely, as `attention.allowed_mask` does)."""
        if self._cross_allowed_L11S is None:
            allowed_LS = ~self.src_padding_mask_LS
            allowed_LS = allowed_LS | ~allowed_LS.any(dim=-1, keepdim=True)
            self._cross_allowed_L11S = allowed_LS[:, None, None, :]
        return self._cross_allowed_L11S

    # ------------------------------------------------------------------------------------------------ beams
    def reorder(self, parent_N: torch.Tensor, sentences_L: Optional[torch.Tensor] = None) -> None:
        """Row n continues former row parent_N[n]; `sentences_L` (former live-sentence indexes) when sentences
        left the batch (then parent_N has K rows per remaining sentence)."""
        if sentences_L is not None:
            self.sources_L = self.sources_L.index_select(0, sentences_L)
            self.src_padding_mask_LS = self.src_padding_mask_LS.index_select(0, sentences_L)
            self._cross_allowed_L11S = None
            self._per_row = {}
            for layer, (k, v) in self._cross_kv.items():
                self._cross_kv[layer] = (k.index_select(0, sentences_L), v.index_select(0, sentences_L))
        rows = parent_N.shape[0]
        for layer, (k, v) in self._self_kv.items():
            spare = self._spare.get(layer)
            if spare is None or spare[0].shape[0] != rows:
                spare = (k.new_empty((rows, *k.shape[1:])), v.new_empty((rows, *v.shape[1:])))
            # Only the cached positions are copied (a gather into the spare buffers' first `length` positions):
            # copying whole rows would cost the capacity at every step.
            t = self.length
            torch.index_select(k[:, :, :t], 0, parent_N, out=spare[0][:, :, :t])
            torch.index_select(v[:, :, :t], 0, parent_N, out=spare[1][:, :, :t])
            self._self_kv[layer], self._spare[layer] = spare, (k, v)
        self.rows = rows
