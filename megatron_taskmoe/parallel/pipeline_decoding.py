"""Greedy and beam-search decoding through pipeline stages: validation BLEU under pipeline parallelism.

Decoding needs every layer, which pipelining spreads over ranks. Here the stages cooperate per batch:

1. Encoding, once per batch: the encoder stages run their layers in order, each sending its output [S_loc, B, D] to
   the next; the last encoder stage sends the encoder output to every decoder stage, which keeps it for the whole
   batch (cross-attention reads it at every step).
2. Search: the last stage runs `generation.beam_search` (greedy is beam 1), the driver. Each of its step-function
   calls first broadcasts the request over the pipeline group: a header (step, N, t), then the N prefixes [N, t]
   and their source indexes [N]. The decoder stages then run their layers on the prefixes in order, passing
   [T_loc, N, D] hidden states along the stage boundary by point-to-point messages; the last stage turns its hidden
   states into next-token log-probabilities and returns them to the search. The other stages serve such requests
   until a header says the search is done (or failed: they raise instead of hanging).
3. The last stage broadcasts the hypotheses (token ids) to the pipeline group, so every rank has the same result.

Each step re-runs the decoder on the whole prefix (as the single-process `EncoderDecoderModel.decode_step`): the
same operations on the same tensors, so the hypotheses equal the single-process decode token for token (tested).
Only the request (a few integers per hypothesis) and the stage-boundary activations travel; the [N, V]
log-probabilities never leave the last stage. Every rank of a stage (tensor, expert and data parallel) runs the
same requests in lockstep, as the collective layers inside need: the validation batches are the same on every rank.

Legend: B batch (source sentences), S source length, N hypotheses, t prefix length, D model dim, V vocabulary;
`_loc` lengths are this rank's sequence-parallel shard.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_taskmoe import platform
from megatron_taskmoe.generation import SearchConfig, beam_search
from megatron_taskmoe.model.encdec import EncoderState
from megatron_taskmoe.parallel.pipeline import EncoderDecoderStage, local_length

_DONE, _STEP, _ABORT = 0, 1, 2


class PipelineDecodingError(RuntimeError):
    """The last stage's search failed; raised on the other stages instead of waiting forever."""


class _Peers:
    """The pipeline group as seen from one stage: global ranks by stage, shapes and dtype of the boundary."""

    def __init__(self, stage: EncoderDecoderStage, pp_group):
        self.stage, self.group = stage, pp_group
        self.layout = stage.layout
        self.ranks = dist.get_process_group_ranks(pp_group)
        self.last = self.ranks[-1]
        self.device = platform.device()
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


def _decoder_step(peers: _Peers, state: EncoderState, prefix_NT: torch.Tensor,
                  src_index_N: torch.Tensor) -> torch.Tensor:
    """This decoder stage's part of one step: receive, run, send on (the last stage returns log-probs)."""
    layout = peers.layout
    N, t = prefix_NT.shape
    shape = (peers.local(t), N, peers.hidden)
    received = None if layout.is_first_decoder_stage else peers.recv(shape, layout.stage - 1)
    out = peers.stage.decode_part(state, prefix_NT, src_index_N, received)
    if not layout.post_process:
        peers.send(out, layout.stage + 1)
    return out


def _header(peers: _Peers, code: int = 0, n: int = 0, t: int = 0) -> list[int]:
    return peers.broadcast_from_last(torch.tensor([code, n, t], dtype=torch.long, device=peers.device)).tolist()


def _serve(peers: _Peers, state: Optional[EncoderState]) -> None:
    """A stage other than the last: run the requested steps until the driver says it is done."""
    while True:
        code, n, t = _header(peers)
        if code == _DONE:
            return
        if code == _ABORT:
            raise PipelineDecodingError(
                f"pipelined decoding failed on the last pipeline stage (global rank {peers.last}); see its error")
        prefix_NT = peers.broadcast_from_last(torch.empty((n, t), dtype=torch.long, device=peers.device))
        src_index_N = peers.broadcast_from_last(torch.empty((n,), dtype=torch.long, device=peers.device))
        if peers.layout.add_decoder:
            _decoder_step(peers, state, prefix_NT, src_index_N)


def _drive(peers: _Peers, state: EncoderState, batch: dict, search: SearchConfig, bos: int, eos: int,
           max_target_len: int) -> list[list[int]]:
    """The last stage: the search, whose every step is a pipelined forward pass."""

    def step_fn(prefix_NT: torch.Tensor, src_index_N: torch.Tensor) -> torch.Tensor:
        n, t = prefix_NT.shape
        _header(peers, _STEP, n, t)
        peers.broadcast_from_last(prefix_NT.to(torch.long).contiguous())
        peers.broadcast_from_last(src_index_N.to(torch.long).contiguous())
        return _decoder_step(peers, state, prefix_NT, src_index_N)

    src_lengths = (~batch["src_padding_mask"].bool()).sum(dim=1).tolist()
    try:
        hyps = beam_search(step_fn, batch_size=len(src_lengths), bos=bos, eos=eos,
                           max_lengths=search.max_lengths(src_lengths, max_target_len),
                           beam_size=search.beam_size, length_penalty=search.length_penalty, device=peers.device)
    except Exception:
        _header(peers, _ABORT)
        raise
    _header(peers, _DONE)
    return hyps


@torch.no_grad()
def pipelined_translate_batch(stage: EncoderDecoderStage, batch: dict, search: SearchConfig, pp_group, *,
                              bos: int, eos: int) -> list[list[int]]:
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
    if peers.layout.post_process:
        hyps = _drive(peers, state, batch, search, bos, eos, stage.model_config.max_target_positions - 1)
    else:
        _serve(peers, state)
        hyps = None
    box = [hyps]
    dist.broadcast_object_list(box, src=peers.last, group=pp_group)
    return box[0]
