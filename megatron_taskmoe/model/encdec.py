"""The encoder-decoder Transformer for multitask translation, from megatron-core parts.

One embedding (`embedding.ScaledEmbedding`: megatron's vocab-parallel word embeddings, scaled by sqrt(d) with
`ModelConfig.scale_embedding`, plus learned positions) serves source and target, and its weight is the output
projection (a column-parallel linear without its own weight). Encoder and decoder are megatron `TransformerBlock`s
built from our specs (`specs.py`: pre-norm layers, SDPA attention, dense or MoE FFN per layer). The loss is
megatron's `vocab_parallel_cross_entropy` plus a tensor-parallel-correct label-smoothing term
(`vocab_parallel_label_smoothed_ce`), per target token, over the real vocabulary: the rows that pad the embedding
to a multiple of `vocab_pad_multiple` are masked out of the softmax and the smoothing.

Task routing and adapters read per-sequence ids from the model's `TaskContext`; `forward` makes the batch's ids
current for exactly the duration of its blocks. MoE auxiliary losses are megatron's mechanism: routers attach them
to the activations with `MoEAuxLossAutoScaler`, so `loss.backward()` includes them, and megatron's aux-loss tracker
logs them per layer (encoder layers are numbered 1..Le, decoder layers Le+1..Le+Ld).

Pipeline stages (designed for, built by the pipeline helpers): as megatron's T5Model a stage holds the encoder
and/or the decoder (`add_encoder`/`add_decoder`), or a slice of their layers (`encoder_layers`/`decoder_layers`);
`pre_process` means it embeds tokens, `post_process` that it computes logits/loss. Each block takes its input
from the embedding if it holds its side's first layer, else from `set_input_tensor`; it applies its final norm
if it holds its side's last layer. With pipelining a decoder stage receives [decoder hidden, encoder output].

Sequence parallelism: activations between layers are [S/TP, B, D]; sequence lengths are padded here to a
multiple of TP (extra positions are padding and dropped from the outputs).

Decoding: `encode` runs the encoder once per batch; `decode_next` appends one token per hypothesis row and returns
the next token's log-probabilities, the decoder's attention layers keeping their keys/values in a
`kv_cache.DecoderCache` (`model/decoding.py` drives the beam search; pipeline stages decode their layers with
`_decoder_layers_next`). `decode_step` re-runs the decoder on whole prefixes: the full-recompute reference.

Legend: B batch, S source length, T target length, D model dim, V vocabulary (Vp padded, V/TP per rank),
N hypotheses in incremental decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_taskmoe.model import init
from megatron_taskmoe.model import routing as R
from megatron_taskmoe.model.config import ModelConfig, ParallelConfig, side_transformer_config, to_transformer_config
from megatron_taskmoe.model.embedding import ScaledEmbedding
from megatron_taskmoe.model.kv_cache import DecoderCache
from megatron_taskmoe.model.specs import block_spec
from megatron_taskmoe.model.task_context import TaskContext


@dataclass
class EncoderState:
    """What decoding needs from the encoder, per source sentence (batch index b)."""

    output_SBD: torch.Tensor
    """[S(/TP), B, D]: the encoder output, this rank's sequence shard under sequence parallelism."""
    src_padding_mask_BS: torch.Tensor
    """[B, S], True at padding (S padded to a multiple of TP)"""
    task_ids_B: Optional[torch.Tensor]
    """Task id of each sentence; None when nothing routes by task."""
    src_lang_ids_B: Optional[torch.Tensor]
    """Source language id of each sentence, or None."""
    tgt_lang_ids_B: Optional[torch.Tensor]
    """Target language id of each sentence, or None."""


def _pad_to_multiple(tokens_BX: torch.Tensor, mask_BX: torch.Tensor, multiple: int, pad_id: int):
    """Right-pad tokens (with pad) and mask (with True) so the length is a multiple of `multiple`."""
    extra = (-tokens_BX.shape[1]) % multiple
    if extra == 0:
        return tokens_BX, mask_BX
    return F.pad(tokens_BX, (0, extra), value=pad_id), F.pad(mask_BX, (0, extra), value=True)


def vocab_parallel_label_smoothed_ce(
    logits_TBV: torch.Tensor, target_TB: torch.Tensor, label_smoothing: float, tp_group,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Label-smoothed cross-entropy [T, B] over vocab-parallel logits [T, B, Vp/TP] (fairseq's and megatron's
    convention: eps' = eps * V / (V - 1) of the mass spread uniformly over the other tokens).

    `vocab_size` is the real vocabulary V; the logits of the rows beyond it (padding of the embedding table) are
    masked to -inf, so they take no probability and no smoothing mass. megatron-core 0.16.1's
    `vocab_parallel_cross_entropy(label_smoothing=...)` averages the log-probabilities over the local vocabulary
    shard only, so its smoothed loss differs between tensor-parallel ranks. Here the unsmoothed loss is megatron's
    and the smoothing term uses tensor-parallel-reduced sums: loss = nll + eps' * (logit[target] - mean(logits)).
    `logits_TBV` is not modified."""
    tp_size, tp_rank = tp_group.size(), tp_group.rank()
    local_vocab = logits_TBV.shape[-1]
    start = tp_rank * local_vocab
    vocab = local_vocab * tp_size if vocab_size is None else vocab_size
    local_real = min(max(vocab - start, 0), local_vocab)
    if local_real < local_vocab:
        padded_V = torch.arange(local_vocab, device=logits_TBV.device) >= local_real
        logits_TBV = logits_TBV.masked_fill(padded_V, float("-inf"))
    if label_smoothing == 0.0:
        # megatron's kernel works in place on its input.
        return tensor_parallel.vocab_parallel_cross_entropy(logits_TBV.clone(), target_TB)
    in_shard_TB = (target_TB >= start) & (target_TB < start + local_vocab)
    local_index_TB = (target_TB - start).clamp(0, local_vocab - 1)
    target_logit_TB = logits_TBV.gather(-1, local_index_TB.unsqueeze(-1)).squeeze(-1)
    target_logit_TB = torch.where(in_shard_TB, target_logit_TB, torch.zeros_like(target_logit_TB))
    mean_logit_TB = logits_TBV[..., :local_real].sum(dim=-1)
    if tp_size > 1:
        target_logit_TB = tensor_parallel.reduce_from_tensor_model_parallel_region(target_logit_TB, tp_group)
        mean_logit_TB = tensor_parallel.reduce_from_tensor_model_parallel_region(mean_logit_TB, tp_group)
    mean_logit_TB = mean_logit_TB / vocab
    # megatron's kernel works in place on its input, which the gather above saved for backward.
    nll_TB = tensor_parallel.vocab_parallel_cross_entropy(logits_TBV.clone(), target_TB)
    eps = label_smoothing * vocab / (vocab - 1)
    return nll_TB + eps * (target_logit_TB - mean_logit_TB)


def _bias_add_residual(layer, bda, out: tuple, residual: torch.Tensor) -> torch.Tensor:
    """megatron's bias-dropout-add of a layer in eval mode (dropout off): (output + bias) + residual, the arithmetic
    of its in-place inference path, without the call through its fusion wrapper; megatron's own where the residual
    and the output differ in dtype (its releases cast them differently)."""
    x, bias = out
    if x.dtype != residual.dtype:
        return bda(False, layer.config.bias_dropout_fusion)(out, residual, layer.hidden_dropout)
    if bias is not None:
        x = x + bias
    return x + residual


def _gather_index(x: Optional[torch.Tensor], index_N: torch.Tensor, dim: int = 0) -> Optional[torch.Tensor]:
    return None if x is None else x.index_select(dim, index_N)


class EncoderDecoderModel(LanguageModule):
    """Encoder-decoder Transformer; forward(batch tensors) -> per-token loss [B, T] or logits [B, T, V]."""

    def __init__(
        self,
        model_config: ModelConfig,
        parallel_config: Optional[ParallelConfig] = None,
        *,
        pg_collection: Optional[ProcessGroupCollection] = None,
        transformer_config: Optional[TransformerConfig] = None,
        pre_process: bool = True,
        post_process: bool = True,
        add_encoder: bool = True,
        add_decoder: bool = True,
        encoder_layers: Optional[Sequence[int]] = None,
        decoder_layers: Optional[Sequence[int]] = None,
        init_seed: Optional[int] = None,
    ) -> None:
        """`init_seed` seeds the initial weights (`init.py`; default: `torch.initial_seed()`, which
        `parallel.groups.model_parallel_manual_seed` sets alike on every rank); with `perform_initialization=False`
        in the config the weights are left for a checkpoint to fill."""
        parallel_config = parallel_config or ParallelConfig()
        config = transformer_config or to_transformer_config(model_config, parallel_config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        super().__init__(config=config, pg_collection=pg_collection)
        if not (add_encoder or add_decoder):
            raise ValueError("EncoderDecoderModel: a stage must hold the encoder, the decoder or both")
        self.model_config = model_config
        self.parallel_config = parallel_config
        self.pre_process, self.post_process = pre_process, post_process
        self.add_encoder, self.add_decoder = add_encoder, add_decoder
        self.share_embeddings_and_output_weights = True
        self.tp_size = pg_collection.tp.size()
        self.vocab_size = model_config.vocab_size
        self.padded_vocab_size = model_config.padded_vocab_size(self.tp_size)
        moe = model_config.moe
        self.task_context = TaskContext(id_limits=None if moe is None else {
            "task": moe.num_tasks, "target_language": moe.num_languages, "source_language": moe.num_languages})
        self.encoder_hidden_state: Optional[torch.Tensor] = None  # set by set_input_tensor on decoder stages
        self.block_layers: dict[str, list[int]] = {}  # side -> the global indexes of the layers this model holds
        # Decoder layers that route by sentence gate on their source sentence's mean encoder output.
        self.decoder_routes_by_source = (moe is not None and moe.decoder.mode == "sentence"
                                         and sum(model_config.moe_pattern("decoder")) > 0)
        self._build_modules(config, encoder_layers, decoder_layers)
        if config.perform_initialization:
            # megatron initialised each module from the global RNG as it built it, which depends on the layout (and
            # set the tensor-parallel attributes, which only its initialisation does): the weights are drawn again,
            # the same under every layout.
            seed = torch.initial_seed() if init_seed is None else init_seed
            init.initialize(self, model_config, seed, init.whole_model_namer(self, self.block_layers))

    # ---------------------------------------------------------------------------------------------- building
    def _build_modules(self, config: TransformerConfig, encoder_layers: Optional[Sequence[int]],
                       decoder_layers: Optional[Sequence[int]]) -> None:
        """The embedding, the blocks this stage holds and the (tied) output layer."""
        if self.pre_process:
            self.embedding = ScaledEmbedding(
                config=config,
                vocab_size=self.padded_vocab_size,
                max_sequence_length=self.model_config.max_positions,
                position_embedding_type="learned_absolute",
                tp_group=self.tp_group,
                scale=self.model_config.embedding_scale,
            )
        self.encoder = self._build_block("encoder", encoder_layers) if self.add_encoder else None
        self.decoder = self._build_block("decoder", decoder_layers) if self.add_decoder else None
        if self.post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                self.padded_vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=self.pre_process,
                tp_group=self.tp_group,
            )
        if self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()

    def _build_block(self, side: str, layers: Optional[Sequence[int]]) -> TransformerBlock:
        cfg = self.model_config
        total = cfg.encoder_layers if side == "encoder" else cfg.decoder_layers
        layers = list(range(total)) if layers is None else list(layers)
        if not layers or layers != list(range(layers[0], layers[0] + len(layers))):
            raise ValueError(f"EncoderDecoderModel: {side}_layers must be a non-empty contiguous range, got {layers}")
        self.block_layers[side] = layers
        block = TransformerBlock(
            config=side_transformer_config(self.config, cfg, side),
            spec=block_spec(cfg, side, self.task_context, layers),
            pre_process=layers[0] == 0,
            post_process=layers[-1] == total - 1,
            pg_collection=self.pg_collection,
        )
        # Global 1-based layer numbers, encoder first: megatron keys its aux-loss tracker by them.
        first = layers[0] + 1 + (cfg.encoder_layers if side == "decoder" else 0)
        for k, layer in enumerate(block.layers):
            layer.layer_number = first + k
            if hasattr(layer.mlp, "set_layer_number"):
                layer.mlp.set_layer_number(first + k)
        return block

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's sharded state dict with the blocks' local keys put back in module order.

        Our layers carry global numbers (encoder first, see `_build_block`), which megatron's TransformerBlock
        uses for both the checkpoint key (what we want: stable across pipeline layouts) and the local dict key
        (which must index `block.layers`, so that `load_state_dict` finds the module). Only dict keys change."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for side in ("encoder", "decoder"):
            head = f"{prefix}{side}.layers."
            indices = sorted({int(k[len(head):].split(".", 1)[0]) for k in sd if k.startswith(head)})
            local = {idx: pos for pos, idx in enumerate(indices)}
            if all(idx == pos for idx, pos in local.items()):
                continue
            renamed = {}
            for key, value in sd.items():
                if key.startswith(head):
                    idx, rest = key[len(head):].split(".", 1)
                    key = f"{head}{local[int(idx)]}.{rest}"
                renamed[key] = value
            sd = renamed
        return sd

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline input: [encoder hidden] on encoder stages, [decoder hidden, encoder output] on decoder ones."""
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        if self.add_encoder:
            if len(input_tensor) != 1:
                raise ValueError("set_input_tensor: an encoder stage takes exactly one input tensor")
            self.encoder.set_input_tensor(input_tensor[0])
        elif len(input_tensor) == 2:
            self.decoder.set_input_tensor(input_tensor[0])
            self.encoder_hidden_state = input_tensor[1]
        elif len(input_tensor) == 1:
            # First decoder stage: the decoder embeds its own input; the encoder output arrives.
            self.decoder.set_input_tensor(None)
            self.encoder_hidden_state = input_tensor[0]
        else:
            raise ValueError("set_input_tensor: a decoder stage takes [encoder output] or [decoder hidden, encoder]")

    # ---------------------------------------------------------------------------------------------- pieces
    def _pad_for_sp(self, tokens_BX: torch.Tensor, mask_BX: torch.Tensor):
        if self.config.sequence_parallel and self.tp_size > 1:
            return _pad_to_multiple(tokens_BX, mask_BX, self.tp_size, self.model_config.pad_id)
        return tokens_BX, mask_BX

    def _embed(self, tokens_BX: torch.Tensor, positions_BX: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings [X, B, D] of tokens at positions 0..X-1, or at `positions_BX` (incremental decoding)."""
        if positions_BX is None:
            length = tokens_BX.shape[1]
            if length > self.model_config.max_positions:
                raise ValueError(
                    f"EncoderDecoderModel: sequence of {length} tokens exceeds the {self.model_config.max_positions} "
                    "learned positions (ModelConfig.max_source_positions / max_target_positions)"
                )
            positions_BX = torch.arange(length, device=tokens_BX.device).unsqueeze(0).expand_as(tokens_BX)
        return self.embedding(input_ids=tokens_BX, position_ids=positions_BX)

    def _sp_mask(self, mask_BX: torch.Tensor) -> torch.Tensor:
        """This rank's slice [B, X/TP] of a padding mask under sequence parallelism (the MoE layers' view)."""
        if not (self.config.sequence_parallel and self.tp_size > 1):
            return mask_BX
        local = mask_BX.shape[1] // self.tp_size
        rank = self.tp_group.rank()
        return mask_BX[:, rank * local : (rank + 1) * local]

    def _run_encoder(self, src_tokens_BS: torch.Tensor, src_padding_mask_BS: torch.Tensor) -> torch.Tensor:
        hidden_SBD = self._embed(src_tokens_BS) if (self.pre_process and self.encoder.pre_process) else None
        return self.encoder(
            hidden_states=hidden_SBD,
            attention_mask=src_padding_mask_BS[:, None, None, :],
            padding_mask=self._sp_mask(src_padding_mask_BS),
        )

    def _run_decoder(
        self,
        tgt_input_BT: torch.Tensor,
        tgt_padding_mask_BT: torch.Tensor,
        encoder_SBD: torch.Tensor,
        src_padding_mask_BS: torch.Tensor,
    ) -> torch.Tensor:
        hidden_TBD = self._embed(tgt_input_BT) if (self.pre_process and self.decoder.pre_process) else None
        if self.decoder_routes_by_source:
            self.task_context.set_source_mean(self._source_mean(encoder_SBD, src_padding_mask_BS))
        return self.decoder(
            hidden_states=hidden_TBD,
            attention_mask=tgt_padding_mask_BT[:, None, None, :],
            context=encoder_SBD,
            context_mask=src_padding_mask_BS[:, None, None, :],
            padding_mask=self._sp_mask(tgt_padding_mask_BT),
        )

    def _source_mean(self, encoder_SBD: torch.Tensor, src_padding_mask_BS: torch.Tensor) -> torch.Tensor:
        """Each source sentence's mean encoder output over its real tokens, [B, D] (summed over the
        sequence-parallel shards, with gradient)."""
        sum_BD, count_B = R.sentence_masked_sum(encoder_SBD, self._sp_mask(src_padding_mask_BS).transpose(0, 1))
        if self.config.sequence_parallel and self.tp_size > 1:
            sum_BD = dist_fn.all_reduce(sum_BD, group=self.tp_group)  # autograd-aware: the backward reduces too
            count_B = count_B.clone()
            torch.distributed.all_reduce(count_B, group=self.tp_group)
        return R.sentence_mean(sum_BD, count_B)

    def _logits(self, hidden_TBD: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [T, B, Vp/TP] (the input is all-gathered over the sequence under SP)."""
        weight = self.shared_embedding_or_output_weight()
        logits_TBV, _ = self.output_layer(hidden_TBD, weight=weight)
        return logits_TBV

    def _full_logits(self, hidden_TBD: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary [B, T, V], gathered over tensor-parallel ranks."""
        logits_TBV = self._logits(hidden_TBD)
        if self.tp_size > 1:
            logits_TBV = tensor_parallel.gather_from_tensor_model_parallel_region(logits_TBV, self.tp_group)
        return logits_TBV[..., : self.vocab_size].transpose(0, 1).contiguous()

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        src_tokens: torch.Tensor,
        src_padding_mask: torch.Tensor,
        tgt_input: torch.Tensor,
        tgt_padding_mask: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        task_ids: Optional[torch.Tensor] = None,
        src_lang_ids: Optional[torch.Tensor] = None,
        tgt_lang_ids: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        label_smoothing: Optional[float] = None,
    ) -> torch.Tensor:
        """Per-token loss [B, T] (label-smoothed cross-entropy, 0 at padding) when `labels` are given, else
        logits [B, T, V]. On a pipeline stage without `post_process` it returns the stage's hidden states.

        `label_smoothing` replaces `ModelConfig.label_smoothing` for this call (0.0: the plain NLL, which validation
        reports). `loss_mask` is accepted so a batch dict can be splatted in; the loss is already zero where
        `tgt_padding_mask` is True, and the trainer applies `loss_mask` when reducing."""
        del loss_mask
        if label_smoothing is None:
            label_smoothing = self.model_config.label_smoothing
        length_T = tgt_input.shape[1]
        src_tokens, src_padding_mask = self._pad_for_sp(src_tokens, src_padding_mask.bool())
        tgt_padded, tgt_mask = self._pad_for_sp(tgt_input, tgt_padding_mask.bool())
        with self.task_context.micro_batch(
            task_ids_B=task_ids,
            tgt_lang_ids_B=tgt_lang_ids,
            src_lang_ids_B=src_lang_ids,
            src_padding_mask_BS=src_padding_mask,
            tgt_padding_mask_BT=tgt_mask,
        ):
            encoder_SBD = None
            if self.add_encoder:
                encoder_SBD = self._run_encoder(src_tokens, src_padding_mask)
                if not self.add_decoder:
                    return encoder_SBD
            else:
                encoder_SBD = self.encoder_hidden_state
            hidden_TBD = self._run_decoder(tgt_padded, tgt_mask, encoder_SBD, src_padding_mask)
        if not self.post_process:
            return hidden_TBD
        if labels is None:
            return self._full_logits(hidden_TBD)[:, :length_T]
        labels_BT = labels
        if tgt_padded.shape[1] != length_T:
            labels_BT = F.pad(labels, (0, tgt_padded.shape[1] - length_T), value=self.model_config.pad_id)
        logits_TBV = self._logits(hidden_TBD).float()
        loss_TB = vocab_parallel_label_smoothed_ce(
            logits_TBV, labels_BT.transpose(0, 1).contiguous(), label_smoothing, self.tp_group,
            vocab_size=self.vocab_size,
        )
        loss_BT = loss_TB.transpose(0, 1).masked_fill(tgt_mask, 0.0)
        return loss_BT[:, :length_T].contiguous()

    # ---------------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def encode(
        self,
        src_tokens: torch.Tensor,
        src_padding_mask: torch.Tensor,
        task_ids: Optional[torch.Tensor] = None,
        src_lang_ids: Optional[torch.Tensor] = None,
        tgt_lang_ids: Optional[torch.Tensor] = None,
    ) -> EncoderState:
        """Run the encoder once for incremental decoding (no pipelining: the whole model on this stage)."""
        self._require_whole_model("encode")
        return self._encoder_layers_state(src_tokens, src_padding_mask, task_ids, src_lang_ids, tgt_lang_ids)

    def _encoder_layers_state(self, src_tokens: torch.Tensor, src_padding_mask: torch.Tensor,
                              task_ids: Optional[torch.Tensor], src_lang_ids: Optional[torch.Tensor],
                              tgt_lang_ids: Optional[torch.Tensor]) -> EncoderState:
        """This model's (or pipeline stage's) encoder layers on a batch; `output_SBD` is the encoder output only
        on a stage holding the last encoder layer (a later stage's block input comes from `set_input_tensor`)."""
        src_tokens, src_padding_mask = self._pad_for_sp(src_tokens, src_padding_mask.bool())
        with self.task_context.micro_batch(
            task_ids_B=task_ids, tgt_lang_ids_B=tgt_lang_ids, src_lang_ids_B=src_lang_ids,
            src_padding_mask_BS=src_padding_mask,
        ):
            output_SBD = self._run_encoder(src_tokens, src_padding_mask)
        return EncoderState(output_SBD, src_padding_mask, task_ids, src_lang_ids, tgt_lang_ids)

    @torch.no_grad()
    def decode_step(self, state: EncoderState, prefix_NT: torch.Tensor, src_index_N: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [N, V] of the next token after each prefix (bos first), hypothesis n decoding
        source sentence `src_index_N[n]` of `state`. Re-runs the decoder on the whole prefix (no KV cache): the
        full-recompute reference of incremental decoding (`decode_next`), for tests and benchmarks."""
        self._require_whole_model("decode_step")
        return self._next_token_logprobs(self._decoder_layers_step(state, prefix_NT, src_index_N),
                                         prefix_NT.shape[1])

    def _decoder_layers_step(self, state: EncoderState, prefix_NT: torch.Tensor,
                             src_index_N: torch.Tensor) -> torch.Tensor:
        """This model's (or pipeline stage's) decoder layers on the prefixes: hidden states [T(/TP), N, D].

        A stage whose decoder block does not start at layer 0 reads its input from the block's
        `set_input_tensor` (the pipelined decoding in `parallel/pipeline_decoding.py` sets it)."""
        mask_NT = torch.zeros_like(prefix_NT, dtype=torch.bool)
        prefix_NT, mask_NT = self._pad_for_sp(prefix_NT, mask_NT)
        src_mask_NS = state.src_padding_mask_BS.index_select(0, src_index_N)
        encoder_SND = state.output_SBD.index_select(1, src_index_N)
        with self.task_context.micro_batch(
            task_ids_B=_gather_index(state.task_ids_B, src_index_N),
            tgt_lang_ids_B=_gather_index(state.tgt_lang_ids_B, src_index_N),
            src_lang_ids_B=_gather_index(state.src_lang_ids_B, src_index_N),
            src_padding_mask_BS=src_mask_NS,
            tgt_padding_mask_BT=mask_NT,
        ):
            return self._run_decoder(prefix_NT, mask_NT, encoder_SND, src_mask_NS)

    def _next_token_logprobs(self, hidden_TND: torch.Tensor, length: int) -> torch.Tensor:
        """Log-probabilities [N, V] at position `length - 1` (the last real prefix position)."""
        logits_NTV = self._full_logits(hidden_TND)
        return torch.log_softmax(logits_NTV[:, length - 1].float(), dim=-1)

    def step_fn(self, state: EncoderState):
        """The full-recompute step function over this model and an encoded batch (`generation.PrefixDecoder`)."""
        return lambda prefix_NT, src_index_N: self.decode_step(state, prefix_NT, src_index_N)

    # ---------------------------------------------------------------------------------- incremental decoding
    # Used by `model/decoding.py` (whole model) and `parallel/pipeline_decoding.py` (stages): one step appends one
    # token per hypothesis row; the attention layers keep their keys/values in a `DecoderCache`.
    def start_decoding(self, state: EncoderState, *, beam_size: int, max_length: int,
                       attention_backend: str = "auto") -> DecoderCache:
        """A cache for decoding `state`'s sentences with `beam_size` rows each, up to `max_length` positions
        (`attention_backend`: `ops.beam_attention`'s, for the self- and cross-attention steps). The
        batch's ids are range-checked here, once for every step, and decoder layers that route by sentence get
        their per-sentence routing state here: the source's mean encoder output, gathered per hypothesis."""
        self.task_context.check_ranges(task_ids_B=state.task_ids_B, tgt_lang_ids_B=state.tgt_lang_ids_B,
                                       src_lang_ids_B=state.src_lang_ids_B)
        cache = DecoderCache(beam_size=beam_size, max_length=max_length, src_padding_mask_BS=state.src_padding_mask_BS,
                             attention_backend=attention_backend)
        if self.add_decoder and self.decoder_routes_by_source:
            cache.source_mean_BD = self._source_mean(state.output_SBD, state.src_padding_mask_BS)
        return cache

    def decode_next(self, state: EncoderState, cache: DecoderCache, tokens_N: torch.Tensor) -> torch.Tensor:
        """Append `tokens_N` to the cached hypotheses (bos at the first step); log-probabilities [N, V] of the
        next token, computed for the last position only. Runs without gradients (the search calls it so; the
        layout is checked at the first step: a step costs little more than these checks at small widths)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.decode_next(state, cache, tokens_N)
        if cache.length == 0:
            self._require_whole_model("decode_next")
        return self._last_position_logprobs(self._decoder_layers_next(state, cache, tokens_N))

    def _decoder_layers_next(self, state: EncoderState, cache: DecoderCache, tokens_N: torch.Tensor) -> torch.Tensor:
        """This model's (or stage's) decoder layers on one new token per row: hidden states [q(/TP), N, D].

        Under sequence parallelism the step carries TP positions (the token, then padding at the same position)
        so that it splits over the ranks; q = 1 otherwise. A stage whose decoder block does not start at layer 0
        reads its input from the block's `set_input_tensor`."""
        n = tokens_N.shape[0]
        q = self.tp_size if (self.config.sequence_parallel and self.tp_size > 1) else 1
        tokens_NQ = tokens_N.view(n, 1)
        mask_NQ = torch.zeros((n, q), dtype=torch.bool, device=tokens_N.device)
        if q > 1:
            tokens_NQ = F.pad(tokens_NQ, (0, q - 1), value=self.model_config.pad_id)
            mask_NQ[:, 1:] = True
        if cache.length + 1 > self.model_config.max_target_positions:
            raise ValueError(f"EncoderDecoderModel: decoding position {cache.length} is past the "
                             f"{self.model_config.max_target_positions} learned target positions")
        hidden_QND = None
        if self.pre_process and self.decoder.pre_process:
            positions_NQ = torch.full_like(tokens_NQ, cache.length)
            hidden_QND = self._embed(tokens_NQ, positions_NQ)
        with self.task_context.micro_batch(
            task_ids_B=cache.per_row("task_ids", state.task_ids_B),
            tgt_lang_ids_B=cache.per_row("tgt_lang_ids", state.tgt_lang_ids_B),
            src_lang_ids_B=cache.per_row("src_lang_ids", state.src_lang_ids_B),
            src_padding_mask_BS=cache.per_row("src_padding_mask", state.src_padding_mask_BS),
            tgt_padding_mask_BT=mask_NQ,
            ids_checked=True,  # by start_decoding
        ):
            if self.decoder_routes_by_source:
                self.task_context.set_source_mean(cache.per_row("source_mean", cache.source_mean_BD))
            hidden_QND = self._decoder_block_step(hidden_QND, state.output_SBD, cache, self._sp_mask(mask_NQ))
        cache.advance()
        return hidden_QND

    def _decoder_block_step(self, hidden_QND: Optional[torch.Tensor], encoder_SBD: torch.Tensor,
                            cache: DecoderCache, padding_mask_NQ: torch.Tensor) -> torch.Tensor:
        """The decoder block on one step: its layers' modules (built from the specs) called in the order and with
        the arithmetic of megatron's `TransformerLayer.forward` in eval mode (pre-norm; residual + (output + bias),
        dropout being off), then the block's final norm. megatron's `TransformerBlock`/`TransformerLayer` forward
        spend about 0.7 ms per layer and call on bookkeeping (CUDA-graph and offloading checks, NVTX ranges,
        viewless tensors), more than a one-token step's arithmetic at d 128; the full forward keeps them, and the
        tests hold the two paths to the same log-probabilities."""
        block = self.decoder
        if not block.pre_process:
            hidden_QND = block.input_tensor
        for layer in block.layers:
            residual = hidden_QND
            out = layer.self_attention(layer.input_layernorm(hidden_QND), None, inference_context=cache)
            hidden_QND = _bias_add_residual(layer, layer.self_attn_bda, out, residual)
            residual = hidden_QND
            out = layer.cross_attention(layer.pre_cross_attn_layernorm(hidden_QND), None,
                                        key_value_states=encoder_SBD, inference_context=cache)
            hidden_QND = _bias_add_residual(layer, layer.cross_attn_bda, out, residual)
            residual = hidden_QND
            out = layer.mlp(layer.pre_mlp_layernorm(hidden_QND), padding_mask=padding_mask_NQ)
            hidden_QND = _bias_add_residual(layer, layer.mlp_bda, out, residual)
        if block.final_layernorm is not None:
            hidden_QND = block.final_layernorm(hidden_QND)
        return hidden_QND

    def _last_position_logprobs(self, hidden_QND: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [N, V] of the step's real position (the first; the others pad a sequence-parallel
        step): one row of logits per hypothesis instead of one per prefix position."""
        if self.config.sequence_parallel and self.tp_size > 1:
            hidden_QND = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_QND, tensor_parallel_output_grad=False, group=self.tp_group)
        logits_NV = F.linear(hidden_QND[0], self.shared_embedding_or_output_weight())
        if self.tp_size > 1:
            logits_NV = tensor_parallel.gather_from_tensor_model_parallel_region(logits_NV, self.tp_group)
        return torch.log_softmax(logits_NV[:, : self.vocab_size].float(), dim=-1)

    def _require_whole_model(self, what: str) -> None:
        if not (self.pre_process and self.post_process and self.add_encoder and self.add_decoder):
            raise RuntimeError(f"EncoderDecoderModel.{what}: needs the whole model on this stage (no pipelining)")
        if not (self.encoder.pre_process and self.encoder.post_process and self.decoder.post_process):
            raise RuntimeError(f"EncoderDecoderModel.{what}: needs every layer on this stage (no pipelining)")
