"""Translating a batch with the whole model in this process: encoder once, then incremental beam search.

`ModelDecoder` is `generation.beam_search`'s decoder over `EncoderDecoderModel.decode_next` and its `DecoderCache`;
`translate_batch` is what the translator, the evaluation tool and on-the-fly validation call. Pipelined models
decode through `parallel/pipeline_decoding.py` instead (each stage keeps its layers' cache).

Legend: B batch (source sentences), S source length, N hypothesis rows, V vocabulary.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_taskmoe.generation import SearchConfig, beam_search
from megatron_taskmoe.model.encdec import EncoderState


class ModelDecoder:
    """`generation.IncrementalDecoder` over a whole `EncoderDecoderModel` and an encoded batch
    (`attention_backend`: the `ops.beam_attention` backend of the attention steps)."""

    def __init__(self, model, state: EncoderState, *, beam_size: int, max_length: int,
                 attention_backend: str = "auto"):
        self.model, self.state = model, state
        self.cache = model.start_decoding(state, beam_size=beam_size, max_length=max_length,
                                          attention_backend=attention_backend)

    def step(self, tokens_N: torch.Tensor) -> torch.Tensor:
        return self.model.decode_next(self.state, self.cache, tokens_N)

    def reorder(self, parent_N: torch.Tensor, sentences_L: Optional[torch.Tensor] = None) -> None:
        self.cache.reorder(parent_N, sentences_L)


def encode_batch(model, batch: dict, device: torch.device) -> EncoderState:
    """The encoder state of a collated batch (the trainer's batch keys) on `device`."""
    return model.encode(batch["src_tokens"].to(device), batch["src_padding_mask"].to(device),
                        task_ids=batch["task_ids"].to(device), src_lang_ids=batch["src_lang_ids"].to(device),
                        tgt_lang_ids=batch["tgt_lang_ids"].to(device))


@torch.no_grad()
def translate_batch(model, batch: dict, search: SearchConfig, *, bos: int, eos: int, banned: Sequence[int] = (),
                    device: torch.device | str = "cpu", max_target_len: Optional[int] = None) -> list[list[int]]:
    """Token ids of the best translation of each source sentence of a collated batch (no bos/eos).

    Output lengths follow `search` (max_len_a * source length + max_len_b), capped at `max_target_len` (by default
    the model's target positions minus bos)."""
    device = torch.device(device)
    state = encode_batch(model, batch, device)
    src_lengths = (~batch["src_padding_mask"].bool()).sum(dim=1).tolist()
    limit = model.model_config.max_target_positions - 1 if max_target_len is None else max_target_len
    max_lengths = search.max_lengths(src_lengths, limit)
    decoder = ModelDecoder(model, state, beam_size=search.beam_size, max_length=max(max_lengths) + 1)
    return beam_search(decoder, batch_size=len(src_lengths), bos=bos, eos=eos, max_lengths=max_lengths,
                       beam_size=search.beam_size, length_penalty=search.length_penalty, min_length=search.min_len,
                       banned=banned, device=device)
