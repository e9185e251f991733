"""Greedy and beam-search decoding through pipeline stages: validation BLEU under pipeline parallelism.

Decoding needs every layer, which pipelining spreads over ranks. Here the stages cooperate per batch:

1. Encoding, once per batch: the encoder stages run their layers in order, each sending its output [S_loc, B, D] to
   the next; the last encoder stage sends the encoder output to every decoder stage, which keeps it for the whole
   batch (its cross-attention layers project it to keys/values at the first step and cache them).
2. Search: the last stage runs `generation.beam_search` (greedy is beam 1), the driver, over an incremental
   decoder whose every call is first broadcast over the pipeline group: a header (step or reorder, N, live
   sentences), then the N new tokens of a step, or the N parent rows (and the live sentences, when some finished)
   of a beam reorder. Each decoder stage keeps its own layers' key/value cache (`kv_cache.DecoderCache`) and
   reorders it as told; for a step the decoder stages run their layers on the one new position per hypothesis in
   order, passing [1, N, D] hidden states along the stage boundary by point-to-point messages; the last stage
   turns its hidden states into next-token log-probabilities and returns them to the search. The other stages
   serve such requests until a header says the search is done (or failed: they raise instead of hanging).
3. The last stage broadcasts the hypotheses (token ids) to the pipeline group, so every rank has the same result.

Every stage runs the single-process model's layers on the same tensors (`EncoderDecoderModel.decode_next`), so the
hypotheses equal the single-process decode token for token (tested). Only the requests (a few integers per
hypothesis) and the stage-boundary activations travel; the [N, V] log-probabilities never leave the last stage.
Every rank of a stage (tensor, expert and data parallel) runs the same requests in lockstep, as the collective
layers inside need: the validation batches are the same on every rank.

Legend: B batch (source sentences), S source length, N hypotheses, L live sentences, D model dim, V vocabulary;
`_loc` lengths are this rank's sequence-parallel shard.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_taskmoe.generation import SearchConfig, beam_search
from megatron_taskmoe.model.encdec import EncoderState
from megatron_taskmoe.model.kv_cache import DecoderCache
from megatron_taskmoe.parallel import groups
from megatron_taskmoe.parallel.pipeline import EncoderDecoderStage, local_length

_DONE, _STEP, _REORDER, _ABORT = 0, 1, 2, 3


class PipelineDecodingError(RuntimeError):
    """The last stage's search failed; raised on the other stages instead of waiting forever."""


class _Peers:
    """The pipeline group as seen from one stage: global ranks by stage, shapes and dtype of the boundary."""

    def __init__(self, stage: EncoderDecoderStage, pp_group):
        self.stage, self.group = stage, pp_group
        self.layout = stage.layout
        self.ranks = dist.get_process_group_ranks(pp_group)
        self.last = self.ranks[-1]
        self.device = groups.device()
        self.dtype = stage.config.params_dtype
        self.hidden = stage.config.hidden_size
        self.tp, self.sp = stage.tp_size, bool(stage.config.sequence_parallel)

    def local(self, length: int) -> int:
        return local_length(length, self.tp, self.sp)

    def send(self, tensor: torch.Tensor, stage: int) -> None:
        dist.send(tensor.to(self.dtype).contiguous(), dst=self.ranks[stage], group=self.group)

    def recv(self, shape: tuple[int, ...], stage: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(buffer, src=self.ranks[stage], group=self.group)
        return buffer

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tensor, src=self.last, group=self.group)
        return tensor


def _encode(peers: _Peers, batch: dict) -> Optional[EncoderState]:
    """Run the encoder stages; returns the encoder state on decoder stages (None on encoder stages)."""
    layout, stage = peers.layout, peers.stage
    B, S = batch["src_tokens"].shape
    shape = (peers.local(S), B, peers.hidden)
    last_encoder = layout.encoder_stages - 1
    if layout.add_encoder:
        received = peers.recv(shape, layout.stage - 1) if layout.stage > 0 else None
        output_SBD = stage.encode_part(batch, received).output_SBD
        targets = [layout.stage + 1] if layout.stage < last_encoder else range(layout.encoder_stages,
                                                                                layout.num_stages)
        for target in targets:
            peers.send(output_SBD, target)
        return None
    output_SBD = peers.recv(shape, last_encoder)
    src_mask_BS = batch["src_padding_mask"].bool()
    extra = shape[0] * (peers.tp if peers.sp else 1) - S  # the model pads sources to a multiple of TP under SP
    if extra:
        src_mask_BS = torch.nn.functional.pad(src_mask_BS, (0, extra), value=True)
    return EncoderState(output_SBD, src_mask_BS, batch.get("task_ids"), batch.get("src_lang_ids"),
                        batch.get("tgt_lang_ids"))


def _decoder_step(peers: _Peers, state: EncoderState, cache: DecoderCache, tokens_N: torch.Tensor) -> torch.Tensor:
    """This decoder stage's part of one step: receive, run, send on (the last stage returns log-probs)."""
    layout = peers.layout
    shape = (1, tokens_N.shape[0], peers.hidden)  # one position per row (a sequence-parallel step is 1 per rank)
    received = None if layout.is_first_decoder_stage else peers.recv(shape, layout.stage - 1)
    out = peers.stage.decode_part(state, cache, tokens_N, received)
    if not layout.post_process:
        peers.send(out, layout.stage + 1)
    return out


def _header(peers: _Peers, code: int = 0, n: int = 0, live: int = -1) -> list[int]:
    return peers.broadcast_from_last(torch.tensor([code, n, live], dtype=torch.long, device=peers.device)).tolist()


def _serve(peers: _Peers, state: Optional[EncoderState], cache: Optional[DecoderCache]) -> None:
    """A stage other than the last: run the requested steps and reorders until the driver says it is done."""
    while True:
        code, n, live = _header(peers)
        if code == _DONE:
            return
        if code == _ABORT:
            raise PipelineDecodingError(
                f"pipelined decoding failed on the last pipeline stage (global rank {peers.last}); see its error")
        index_N = peers.broadcast_from_last(torch.empty((n,), dtype=torch.long, device=peers.device))
        if code == _STEP:
            if peers.layout.add_decoder:
                _decoder_step(peers, state, cache, index_N)
            continue
        sentences_L = None
        if live >= 0:
            sentences_L = peers.broadcast_from_last(torch.empty((live,), dtype=torch.long, device=peers.device))
        if peers.layout.add_decoder:
            cache.reorder(index_N, sentences_L)


class _Driver:
    """The last stage's `generation.IncrementalDecoder`: every step and reorder is first announced to the other
    stages (a header, then the token or parent ids), then run here."""

    def __init__(self, peers: _Peers, state: EncoderState, cache: DecoderCache):
        self.peers, self.state, self.cache = peers, state, cache

    def step(self, tokens_N: torch.Tensor) -> torch.Tensor:
        _header(self.peers, _STEP, tokens_N.shape[0])
        self.peers.broadcast_from_last(tokens_N.to(torch.long).contiguous())
        return _decoder_step(self.peers, self.state, self.cache, tokens_N)

    def reorder(self, parent_N: torch.Tensor, sentences_L: Optional[torch.Tensor] = None) -> None:
        live = -1 if sentences_L is None else sentences_L.shape[0]
        _header(self.peers, _REORDER, parent_N.shape[0], live)
        self.peers.broadcast_from_last(parent_N.to(torch.long).contiguous())
        if sentences_L is not None:
            self.peers.broadcast_from_last(sentences_L.to(torch.long).contiguous())
        self.cache.reorder(parent_N, sentences_L)


def _drive(peers: _Peers, state: EncoderState, cache: DecoderCache, search: SearchConfig, max_lengths: list[int], *,
           bos: int, eos: int, banned: Sequence[int]) -> list[list[int]]:
    """The last stage: the search, whose every step is a pipelined forward pass."""
    try:
        hyps = beam_search(_Driver(peers, state, cache), batch_size=len(max_lengths), bos=bos, eos=eos,
                           max_lengths=max_lengths, beam_size=search.beam_size,
                           length_penalty=search.length_penalty, min_length=search.min_len, banned=banned,
                           device=peers.device)
    except Exception:
        _header(peers, _ABORT)
        raise
    _header(peers, _DONE)
    return hyps


@torch.no_grad()
def pipelined_translate_batch(stage: EncoderDecoderStage, batch: dict, search: SearchConfig, pp_group, *,
                              bos: int, eos: int, banned: Sequence[int] = ()) -> list[list[int]]:
    """Token ids of the best translation of each source sentence in `batch` (no bos/eos), on every rank of the
    pipeline group; collective over it (and, inside the stages, over their tensor/expert groups).

    `stage` is this rank's unwrapped `EncoderDecoderStage` (in eval mode); `batch` the same collated batch on
    every rank."""
    if stage.training:
        raise RuntimeError("pipelined_translate_batch: put the stage in eval mode (dropout would differ per rank)")
    peers = _Peers(stage, pp_group)
    dev = peers.device
    batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    state = _encode(peers, batch)
    src_lengths = (~batch["src_padding_mask"].bool()).sum(dim=1).tolist()
    max_lengths = search.max_lengths(src_lengths, stage.model_config.max_target_positions - 1)
    cache = None
    if peers.layout.add_decoder:
        cache = stage.start_decoding(state, beam_size=search.beam_size, max_length=max(max_lengths) + 1)
    if peers.layout.post_process:
        hyps = _drive(peers, state, cache, search, max_lengths, bos=bos, eos=eos, banned=banned)
    else:
        _serve(peers, state, cache)
        hyps = None
    box = [hyps]
    dist.broadcast_object_list(box, src=peers.last, group=pp_group)
    return box[0]
