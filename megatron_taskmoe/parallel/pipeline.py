"""Pipeline parallelism for the encoder-decoder: encoder stages first, decoder stages after, 1F1B schedule.

megatron-core 0.16 has no pipelining for T5-style models (Megatron-LM's `pretrain_t5.py` refuses it). This module
builds it from megatron's parts:

* Layout (`stage_layout`): `ParallelConfig.encoder_pipeline_stages` leading stages split the encoder layers evenly,
  the remaining stages split the decoder layers. The first encoder stage and the first decoder stage embed tokens
  (both with the one shared embedding), the last stage computes the loss with the output layer tied to it.
* Embedding groups (`parallel.groups.initialize_model_parallel`): megatron's embedding group holds every stage with
  a copy of the shared word embedding (first encoder, first decoder, last stage) and its position-embedding group
  the two stages that embed, so megatron's `finalize_model_grads` all-reduces the tied gradients across them. The
  copies start equal (`EncoderDecoderStage.setup_embeddings_and_output_layer`: all but the first stage's are zeroed and
  summed over the group) and are checkpointed once (the others are marked as replicas).
* What crosses a stage boundary: ONE tensor per micro-batch. Encoder stages pass the encoder hidden states
  [S, B, D]; decoder stages pass concat(decoder hidden [T, B, D], encoder output [S, B, D]) along the sequence, so
  the encoder output reaches every decoder stage (cross-attention). A single tensor is what megatron's 1F1B
  schedule can carry both ways: its `forward_step` wraps a stage's output in a one-element list and its
  `backward_step` back-propagates only the first output tensor, so a second, passed-through tensor would lose the
  gradient that later decoder stages send back for it. Concatenated, the pass-through is part of the autograd
  graph and `torch.cat`'s backward routes that gradient to the received tensor. The per-stage receive/send shapes
  go to the schedule through its `adjust_tensor_shapes_fn` (`stage_tensor_shapes`).
* Sequence lengths: with `TransformerConfig.variable_seq_lengths` (our default for pipeline > 1) the p2p layer
  exchanges shapes first, so every micro-batch may have its own source and target lengths. Without it the
  shapes are static: every micro-batch must be padded to the same (B, S, T) (`BatchingConfig.fixed_src_len`/
  `fixed_tgt_len`), which `forward_backward` checks before anything is sent.
* Every stage reads the same micro-batch from its own data iterator (task ids and padding masks are needed by the
  routers and adapters of every stage); the stage's `TaskContext` is set per forward by the model.

Legend: B micro-batch size, S source length, T target length, D model dim; `_loc` lengths are this rank's
sequence-parallel shard (padded length / TP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
)
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_taskmoe.compat import aux_losses
from megatron_taskmoe.model.config import ModelConfig, ParallelConfig, to_transformer_config
from megatron_taskmoe.model.encdec import EncoderDecoderModel, EncoderState
from megatron_taskmoe.model.kv_cache import DecoderCache
from megatron_taskmoe.parallel import groups

Shape = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------------- layout
@dataclass(kw_only=True, frozen=True)
class StageLayout:
    """What one pipeline stage holds (pure data; `stage_layout` computes it)."""

    stage: int
    """This stage's 0-based index."""
    num_stages: int
    """Number of pipeline stages."""
    encoder_stages: int
    """Leading stages holding the encoder (0 without pipelining, where one stage holds everything)."""
    encoder_layers: Optional[tuple[int, ...]]
    """0-based encoder layer indexes on this stage, None if it holds no encoder layer."""
    decoder_layers: Optional[tuple[int, ...]]
    """0-based decoder layer indexes on this stage, None if it holds no decoder layer."""

    @property
    def add_encoder(self) -> bool:
        return self.encoder_layers is not None

    @property
    def add_decoder(self) -> bool:
        return self.decoder_layers is not None

    @property
    def pre_process(self) -> bool:
        """Embeds tokens: the first encoder stage and the first decoder stage."""
        return self.stage == 0 or self.is_first_decoder_stage

    @property
    def post_process(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def is_first_decoder_stage(self) -> bool:
        return self.num_stages > 1 and self.stage == self.encoder_stages


def stage_layout(model: ModelConfig, parallel: ParallelConfig, stage: int) -> StageLayout:
    """The layers of pipeline stage `stage` (0-based) under `parallel` (validated first)."""
    parallel.validate(model)
    pp = parallel.pipeline
    if not 0 <= stage < pp:
        raise ValueError(f"stage_layout: stage {stage} is outside the {pp} pipeline stages")
    if pp == 1:
        return StageLayout(stage=0, num_stages=1, encoder_stages=0,
                           encoder_layers=tuple(range(model.encoder_layers)),
                           decoder_layers=tuple(range(model.decoder_layers)))
    enc = parallel.encoder_pipeline_stages
    if stage < enc:
        per = model.encoder_layers // enc
        return StageLayout(stage=stage, num_stages=pp, encoder_stages=enc,
                           encoder_layers=tuple(range(stage * per, (stage + 1) * per)), decoder_layers=None)
    per = model.decoder_layers // (pp - enc)
    first = (stage - enc) * per
    return StageLayout(stage=stage, num_stages=pp, encoder_stages=enc, encoder_layers=None,
                       decoder_layers=tuple(range(first, first + per)))


def local_length(length: int, tensor_parallel: int, sequence_parallel: bool) -> int:
    """This rank's share of a sequence of `length` positions between layers (the model pads to a multiple of TP
    under sequence parallelism)."""
    if not sequence_parallel or tensor_parallel == 1:
        return length
    return -(-length // tensor_parallel)


def stage_tensor_shapes(layout: StageLayout, *, src_len: int, tgt_len: int, micro_batch_size: int,
                        hidden_size: int, tensor_parallel: int = 1,
                        sequence_parallel: bool = False) -> tuple[list[Shape], list[Shape]]:
    """(receive shapes, send shapes) of one stage for micro-batches of [B, S] sources and [B, T] targets.

    Encoder stages move [S_loc, B, D]; decoder stages move [T_loc + S_loc, B, D] (decoder hidden, then the
    encoder output). The first stage receives nothing and the last sends nothing, but megatron's schedule still
    takes a shape for them (it never uses it)."""
    s_loc = local_length(src_len, tensor_parallel, sequence_parallel)
    t_loc = local_length(tgt_len, tensor_parallel, sequence_parallel)
    encoder: Shape = (s_loc, micro_batch_size, hidden_size)
    decoder: Shape = (t_loc + s_loc, micro_batch_size, hidden_size)
    if layout.add_encoder:
        return [encoder], [encoder]
    if layout.is_first_decoder_stage:
        return [encoder], [decoder]
    return [decoder], [decoder]


# ---------------------------------------------------------------------------------------------------- stage
_LAYER_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.")


class EncoderDecoderStage(EncoderDecoderModel):
    """One pipeline stage of `EncoderDecoderModel` (the whole model when pipeline == 1).

    Adds to the model what pipelining needs and the model leaves to it: the single-tensor stage boundary
    (split on input, concatenated on output, see the module docstring), equal copies of the shared embeddings on
    every stage that holds one, and checkpoint entries that store those copies once."""

    def __init__(self, model_config: ModelConfig, parallel_config: ParallelConfig, layout: StageLayout, *,
                 pg_collection=None, transformer_config=None, init_seed: Optional[int] = None) -> None:
        super().__init__(
            model_config, parallel_config, pg_collection=pg_collection, transformer_config=transformer_config,
            init_seed=init_seed,
            pre_process=layout.pre_process, post_process=layout.post_process, add_encoder=layout.add_encoder,
            add_decoder=layout.add_decoder,
            encoder_layers=None if layout.encoder_layers is None else list(layout.encoder_layers),
            decoder_layers=None if layout.decoder_layers is None else list(layout.decoder_layers),
        )
        if pg_collection is not None and pg_collection.pp.size() != layout.num_stages:
            raise ValueError(f"EncoderDecoderStage: layout has {layout.num_stages} stages, the pipeline group "
                             f"{pg_collection.pp.size()}")
        self.layout = layout
        self._received: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------- embeddings
    @property
    def position_embeddings(self) -> torch.nn.Module:
        """megatron's `finalize_model_grads` all-reduces `model.position_embeddings.weight` over the
        position-embedding group; ours live in the shared `LanguageModelEmbedding`."""
        return self.embedding.position_embeddings

    def _is_first_pipeline_stage(self) -> bool:
        return self.pp_group.rank() == 0

    def setup_embeddings_and_output_layer(self) -> None:
        """Make every copy of the shared embeddings start equal to the first stage's, and mark them for megatron.

        megatron's version knows two copies (first stage embeds, last stage projects) and moves the weight with
        `.cuda()` (CPU-initialized weights must reach NCCL on the GPU); here the first decoder stage embeds too, and
        its word and position embeddings are copies. Copies other than the first stage's are zeroed, then summed
        over the group (megatron's way to broadcast) on the process group's device, and marked `shared` so
        gradient norms count them once."""
        if self.config.pipeline_model_parallel_size == 1:
            super().setup_embeddings_and_output_layer()
            return
        if self.pre_process:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        first = self._is_first_pipeline_stage()
        word = self.shared_embedding_or_output_weight()
        word.shared_embedding = True
        copies = [(word, self.embd_group)]
        if self.pre_process:
            copies.append((self.embedding.position_embeddings.weight, self.pg_collection.pos_embd))
        for weight, group in copies:
            if not first:
                weight.data.zero_()
                weight.shared = True
            if group is None or group.size() == 1:
                raise RuntimeError(
                    "EncoderDecoderStage: the shared embedding is not in an embedding group of its stages; "
                    "initialize process groups with megatron_taskmoe.parallel.groups.initialize_model_parallel")
            summed = weight.data.to(groups.device())
            torch.distributed.all_reduce(summed, group=group)
            weight.data.copy_(summed)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """As the model's, with the first decoder stage's embedding entries marked as replicas of the first
        stage's (the same checkpoint keys; only one copy may be the main replica)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.pre_process and not self._is_first_pipeline_stage():
            head = f"{prefix}embedding."
            for key, entry in sd.items():
                if key.startswith(head) and hasattr(entry, "replica_id"):
                    rid = entry.replica_id
                    entry.replica_id = (2,) + (tuple(rid[1:]) if isinstance(rid, tuple) else (rid,))
        return sd

    # ------------------------------------------------------------------------------------- boundary
    def set_input_tensor(self, input_tensor) -> None:
        """The schedule's received tensor(s): [None] on the first stage, else the one boundary tensor."""
        tensors = input_tensor if isinstance(input_tensor, list) else [input_tensor]
        if self.add_encoder or self.layout.num_stages == 1:
            super().set_input_tensor(tensors)
            return
        if len(tensors) != 1:
            raise ValueError(f"EncoderDecoderStage.set_input_tensor: a decoder stage receives one tensor, "
                             f"got {len(tensors)}")
        self._received = tensors[0]

    def _local(self, length: int) -> int:
        return local_length(length, self.tp_size, bool(self.config.sequence_parallel))

    def forward(self, src_tokens: torch.Tensor, src_padding_mask: torch.Tensor, tgt_input: torch.Tensor,
                tgt_padding_mask: torch.Tensor, **batch: Any) -> torch.Tensor:
        """The stage's part of `EncoderDecoderModel.forward` on one micro-batch (all batch tensors on every
        stage): encoder stages return [S_loc, B, D], inner decoder stages [T_loc + S_loc, B, D], the last stage
        the model's per-token loss [B, T] (or logits without labels)."""
        pipelined = self.layout.num_stages > 1
        if pipelined and self.add_decoder:
            received = self._received
            if received is None:
                raise RuntimeError("EncoderDecoderStage.forward: no input tensor was set for this decoder stage")
            s_loc, t_loc = self._local(src_tokens.shape[1]), self._local(tgt_input.shape[1])
            expected = s_loc if self.layout.is_first_decoder_stage else t_loc + s_loc
            if received.shape[0] != expected:
                raise ValueError(
                    f"EncoderDecoderStage (stage {self.layout.stage}): received {received.shape[0]} positions, "
                    f"the micro-batch (S={src_tokens.shape[1]}, T={tgt_input.shape[1]}) needs {expected}: every "
                    "stage must read the same micro-batches")
            if self.layout.is_first_decoder_stage:
                super().set_input_tensor([received])
            else:
                super().set_input_tensor([received[:t_loc], received[t_loc:]])
        output = super().forward(src_tokens, src_padding_mask, tgt_input, tgt_padding_mask, **batch)
        if pipelined and self.add_decoder and not self.post_process:
            output = torch.cat([output, self.encoder_hidden_state], dim=0)
        if pipelined and self.add_decoder:
            self._received = None
            self.encoder_hidden_state = None
        return output

    # ------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def encode_part(self, batch: dict, received_SBD: Optional[torch.Tensor] = None) -> EncoderState:
        """This encoder stage's layers on a batch for decoding (`parallel/pipeline_decoding.py`): its
        `output_SBD` is [S_loc, B, D], the encoder output on the last encoder stage. `received_SBD` is the previous
        stage's output (None on stage 0, which embeds)."""
        if not self.add_encoder:
            raise RuntimeError(f"EncoderDecoderStage.encode_part: stage {self.layout.stage} holds no encoder layer")
        if not self.encoder.pre_process:
            if received_SBD is None:
                raise RuntimeError("EncoderDecoderStage.encode_part: a later encoder stage needs its input")
            self.encoder.set_input_tensor(received_SBD)
        return self._encoder_layers_state(batch["src_tokens"], batch["src_padding_mask"], batch.get("task_ids"),
                                          batch.get("src_lang_ids"), batch.get("tgt_lang_ids"))

    @torch.no_grad()
    def decode_part(self, state: EncoderState, cache: DecoderCache, tokens_N: torch.Tensor,
                    received_QND: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One incremental decoding step on this decoder stage, whose layers keep their keys/values in `cache`
        (`start_decoding`): the next-token log-probabilities [N, V] on the last stage, else the hidden states
        [1, N, D] for the next stage. `state.output_SBD` is the encoder output; `received_QND` the previous decoder
        stage's output (None on the first decoder stage, which embeds `tokens_N`)."""
        if not self.add_decoder:
            raise RuntimeError(f"EncoderDecoderStage.decode_part: stage {self.layout.stage} holds no decoder layer")
        if not self.decoder.pre_process:
            if received_QND is None:
                raise RuntimeError("EncoderDecoderStage.decode_part: a later decoder stage needs its input")
            self.decoder.set_input_tensor(received_QND)
        hidden_QND = self._decoder_layers_next(state, cache, tokens_N)
        if not self.post_process:
            return hidden_QND
        return self._last_position_logprobs(hidden_QND)

    # ------------------------------------------------------------------------------------- names
    def whole_model_name(self, name: str) -> str:
        """The single-process model's name of this stage's parameter `name` (layer indexes are global within
        their side; the last stage's output weight is the tied word embedding)."""
        if name == "output_layer.weight":
            return "embedding.word_embeddings.weight"
        match = _LAYER_KEY.match(name)
        if match is None:
            return name
        side, local = match.group(1), int(match.group(2))
        layers = self.layout.encoder_layers if side == "encoder" else self.layout.decoder_layers
        return f"{side}.layers.{layers[local]}.{name[match.end():]}"


def build_stage(model: ModelConfig, parallel: ParallelConfig, *, pg_collection=None, transformer_config=None,
                dtype: Optional[torch.dtype] = None, init_seed: Optional[int] = None) -> EncoderDecoderStage:
    """This rank's stage (its pipeline rank decides which) with megatron's model type set for the schedules.

    `transformer_config` defaults to `to_transformer_config(model, parallel)` with the pipeline's p2p dtype;
    `init_seed` as `EncoderDecoderModel`'s."""
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if transformer_config is None:
        overrides = {"pipeline_dtype": dtype or model.torch_dtype} if parallel.pipeline > 1 else {}
        transformer_config = to_transformer_config(model, parallel, **overrides)
    if pg_collection.pp.size() != parallel.pipeline:
        raise ValueError(f"build_stage: ParallelConfig.pipeline={parallel.pipeline} but megatron's pipeline group "
                         f"has {pg_collection.pp.size()} ranks (initialize_model_parallel with the same config)")
    layout = stage_layout(model, parallel, pg_collection.pp.rank())
    stage = EncoderDecoderStage(model, parallel, layout, pg_collection=pg_collection,
                                transformer_config=transformer_config, init_seed=init_seed)
    stage.model_type = ModelType.encoder_or_decoder
    return stage


def unwrap(model: torch.nn.Module) -> EncoderDecoderStage:
    """The stage inside megatron's DDP / Float16Module wrappers."""
    while not isinstance(model, EncoderDecoderModel):
        if not hasattr(model, "module"):
            raise TypeError(f"unwrap: {type(model).__name__} wraps no EncoderDecoderModel")
        model = model.module
    return model


# ---------------------------------------------------------------------------------------------------- schedule
class _FixedShapeBatches:
    """Passes batches through, refusing one whose shape differs from the static pipeline shapes."""

    def __init__(self, batches: Iterator[dict], micro_batch_size: int, src_len: int, tgt_len: int):
        self.batches, self.shape = batches, (micro_batch_size, src_len, tgt_len)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        shape = (batch["src_tokens"].shape[0], batch["src_tokens"].shape[1], batch["tgt_input"].shape[1])
        if shape != self.shape:
            raise ValueError(
                f"pipeline micro-batch of (B, S, T) = {shape} differs from the static shapes {self.shape}: pad "
                "batches to fixed lengths (BatchingConfig.fixed_src_len/fixed_tgt_len and batch_size) or set "
                "TransformerConfig.variable_seq_lengths")
        return batch


def forward_backward(*, forward_step_func: Callable, data_iterator: Iterator[dict], model: torch.nn.Module,
                     num_microbatches: int, micro_batch_size: Optional[int] = None, src_len: Optional[int] = None,
                     tgt_len: Optional[int] = None, forward_only: bool = False) -> list:
    """Run `num_microbatches` micro-batches through the stages with megatron's 1F1B schedule (its no-pipelining
    schedule when pipeline == 1); returns the last stage's loss-function outputs (empty on other stages).

    `model` is this rank's stage, wrapped (DDP) or not. With `config.variable_seq_lengths` the sizes are
    optional (shapes travel with the tensors); otherwise every micro-batch must be [micro_batch_size, src_len]
    / [micro_batch_size, tgt_len]."""
    stage = unwrap(model)
    config = stage.config
    if stage.layout.num_stages == 1:
        return forward_backward_no_pipelining(
            forward_step_func=forward_step_func, data_iterator=data_iterator, model=[model],
            num_microbatches=num_microbatches, seq_length=1, micro_batch_size=1, forward_only=forward_only)
    if config.pipeline_dtype is None:
        raise ValueError("forward_backward: TransformerConfig.pipeline_dtype is not set (build_stage sets it)")
    sizes = (micro_batch_size, src_len, tgt_len)
    if not config.variable_seq_lengths:
        if None in sizes:
            raise ValueError("forward_backward: static pipeline shapes (variable_seq_lengths=False) need "
                             "micro_batch_size, src_len and tgt_len")
        data_iterator = _FixedShapeBatches(data_iterator, micro_batch_size, src_len, tgt_len)
    # With variable lengths the shapes below are placeholders: the p2p layer sends the real ones first.
    recv, send = stage_tensor_shapes(stage.layout, src_len=src_len or 1, tgt_len=tgt_len or 1,
                                     micro_batch_size=micro_batch_size or 1, hidden_size=config.hidden_size,
                                     tensor_parallel=stage.tp_size,
                                     sequence_parallel=bool(config.sequence_parallel))
    return forward_backward_pipelining_without_interleaving(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=[model],
        num_microbatches=num_microbatches, seq_length=src_len or 1, micro_batch_size=micro_batch_size or 1,
        decoder_seq_length=tgt_len, forward_only=forward_only,
        adjust_tensor_shapes_fn=lambda _recv, _send: (recv, send))


def sum_over_pipeline(values: torch.Tensor, pg_collection) -> torch.Tensor:
    """All-reduce (sum) a small tensor of step statistics over the pipeline group, so that what only the last
    stage computed (the loss) is known on every stage; a no-op without pipelining."""
    if pg_collection.pp.size() > 1:
        torch.distributed.all_reduce(values, group=pg_collection.pp)
    return values


def validation_losses(model: torch.nn.Module, batches: dict[str, list[dict]], forward_step_func: Callable,
                      pg_collection) -> dict[str, float]:
    """Mean token loss per key of `batches` (e.g. per direction), forward-only through the pipeline in eval mode;
    the same numbers on every rank. `forward_step_func`'s loss function reports `{"lm loss": [sum, tokens]}`."""
    stage = unwrap(model)
    was_training = stage.training
    stage.eval()
    out = {}
    try:
        with torch.no_grad():
            for key, items in batches.items():
                totals = torch.zeros(2, device=groups.device())
                if items:
                    reported = forward_backward(forward_step_func=forward_step_func, data_iterator=iter(items),
                                                model=model, num_microbatches=len(items), forward_only=True)
                    for item in reported:
                        totals += item["lm loss"].detach().float()
                sum_over_pipeline(totals, pg_collection)
                out[key] = float(totals[0] / totals[1].clamp(min=1))
    finally:
        stage.train(was_training)
    return out


def align_aux_loss_tracker(pg_collection, num_layers: int) -> None:
    """Give megatron's MoE aux-loss tracker the same entries, in the same order, on every pipeline stage.

    Each stage records only its own layers' losses (e.g. `encoder_*` names on encoder stages), but megatron's
    reduction all-reduces entry by entry over the pipeline group in the tracker's order: different names would sum
    unrelated entries (or hang). Missing entries are added as zeros (sums unchanged), reduced over this rank's
    tensor-parallel group where the stages that own them reduce over theirs (routers under sequence parallelism
    record per-shard values), so every stage ends with the same totals."""
    if pg_collection.pp.size() == 1:
        return
    entries = aux_losses.aux_loss_entries()
    mine = {}
    for name, entry in entries.items():
        if entry.avg_group is not None:
            raise RuntimeError(f"align_aux_loss_tracker: aux loss {name!r} has an averaging group, which pipeline "
                               "stages without it cannot mirror")
        group = entry.reduce_group
        mine[name] = (0 if group is None else group.size(), entry.needs_dp_avg)
    gathered: list = [None] * pg_collection.pp.size()
    torch.distributed.all_gather_object(gathered, mine, group=pg_collection.pp)
    owners = {}
    for stage_entries in gathered:
        owners.update(stage_entries)
    aligned = {}
    for name in sorted(owners):
        if name in entries:
            aligned[name] = entries[name]
            continue
        group_size, needs_dp_avg = owners[name]
        if group_size and group_size != pg_collection.tp.size():
            raise RuntimeError(f"align_aux_loss_tracker: aux loss {name!r} is reduced over a group of {group_size} "
                               f"ranks, not the tensor-parallel group of {pg_collection.tp.size()}")
        aligned[name] = aux_losses.AuxLossEntry(values=torch.zeros(num_layers, device=groups.device()),
                                                  reduce_group=pg_collection.tp if group_size else None,
                                                  needs_dp_avg=needs_dp_avg)
    aux_losses.set_aux_loss_entries(aligned)
