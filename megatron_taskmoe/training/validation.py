"""On-the-fly validation per task: loss, and sacrebleu BLEU/chrF of greedy or beam-search translations.

Every rank evaluates the same sentences in lockstep. That is what expert and tensor parallelism need (each forward is
collective over the experts' and tensors' groups) and it makes the result identical on all ranks, so any rank can
decide on early stopping. Validation sets are small (`eval.max_sentences` per direction), so the duplicated work
across data-parallel ranks is cheap.

References are the validation targets decoded from their sentence pieces, so they match the raw text up to
sentencepiece's normalisation; `tools/evaluate.py` scores against raw test text. Translations are decoded
incrementally (`model/decoding.py`: key/value caches, vectorised beam search), as `tools/translate.py` decodes.

With pipeline parallelism the loss goes forward-only through megatron's 1F1B schedule and the translations through
the stages one decoding step at a time (`parallel/pipeline_decoding.py`); each stage counts the routing of its own
layers and the counts are gathered over the pipeline group, so the record is the same as without pipelining.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm
import torch

from megatron_taskmoe import platform
from megatron_taskmoe.data.batching import collate, BatchingConfig
from megatron_taskmoe.data.dataset import MultilingualDataset
from megatron_taskmoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, language_tag_ids
from megatron_taskmoe.evaluation import mean, score_corpus
from megatron_taskmoe.generation import SearchConfig
from megatron_taskmoe.model.decoding import translate_batch
from megatron_taskmoe.model.moe import (all_reduce_routing_stats, pause_routing_stats, routing_stats,
                                        set_routing_stats)

if TYPE_CHECKING:
    from megatron_taskmoe.training.loop import Trainer

_MODEL_KEYS = ("src_tokens", "src_padding_mask", "tgt_input", "tgt_padding_mask", "labels", "task_ids",
               "src_lang_ids", "tgt_lang_ids")


class Validator:
    """Validation of a Trainer's model on the first `eval.max_sentences` sentences of each direction."""

    def __init__(self, trainer: "Trainer"):
        cfg = trainer.cfg
        self.trainer = trainer
        corpus = trainer.corpus
        directions = [d for d in corpus.directions
                      if cfg.data.valid_split in corpus.manifest["directions"][d]["splits"]]
        if not directions:
            raise ValueError(f"{corpus.data_dir}: no direction has a {cfg.data.valid_split!r} split to validate on")
        self.data = MultilingualDataset(corpus.data_dir, cfg.data.valid_split, directions,
                                        max_src_len=trainer.model_cfg.max_source_positions - 2,
                                        max_tgt_len=trainer.model_cfg.max_target_positions - 1)
        self.sp = spm.SentencePieceProcessor(model_file=str(corpus.tokenizer_path))
        self.search = SearchConfig(beam_size=cfg.eval.beam_size, length_penalty=cfg.eval.length_penalty,
                                   max_len_a=cfg.eval.max_len_a, max_len_b=cfg.eval.max_len_b)
        self.batching = BatchingConfig(max_tokens=cfg.data.max_tokens, pad_to_multiple=cfg.data.pad_to_multiple)
        self.max_sentences = cfg.eval.max_sentences
        self.banned = sorted({PAD_ID, BOS_ID, UNK_ID, *language_tag_ids(self.sp)})

    def _batches(self, direction: str):
        """Length-sorted batches of the direction's first max_sentences sentences (deterministic)."""
        d = self.data.directions.index(direction)
        lo = int(self.data.offsets_D[d])
        n = min(int(self.data.sizes_D[d]), self.max_sentences)
        order = np.argsort(self.data.src_lengths_N[lo:lo + n], kind="stable")
        budget = self.batching.max_tokens
        start = 0
        while start < n:
            end = start + 1
            while end < n:
                longest = max(self.data.src_lengths_N[lo + order[end]], self.data.tgt_lengths_N[lo + order[end]])
                if longest * (end - start + 1) > budget:
                    break
                end += 1
            yield collate([self.data[lo + int(i)] for i in order[start:end]], self.batching)
            start = end

    @property
    def pipelined(self) -> bool:
        return self.trainer.cfg.parallel.pipeline > 1

    def translate(self, batch: dict) -> list[list[int]]:
        """Token ids of the translations of a collated batch (no bos/eos); the same on every rank."""
        model = self.trainer.built.module
        if not self.pipelined:
            return translate_batch(model, batch, self.search, bos=BOS_ID, eos=EOS_ID, banned=self.banned,
                                   device=platform.device())
        from megatron_taskmoe.parallel.pipeline_decoding import pipelined_translate_batch

        return pipelined_translate_batch(model, {k: batch[k] for k in _MODEL_KEYS}, self.search,
                                         self.trainer.built.pg_collection.pp, bos=BOS_ID, eos=EOS_ID,
                                         banned=self.banned)

    def hypotheses(self, direction: str) -> list[list[int]]:
        """Token ids of the translations of `direction`'s validation sentences, in `_batches` order (the model
        must be in eval mode)."""
        return [ids for batch in self._batches(direction) for ids in self.translate(batch)]

    def _pipeline_losses(self) -> dict[str, float]:
        """Mean token loss per direction, forward-only through the pipeline stages."""
        from megatron_taskmoe.parallel import pipeline
        from megatron_taskmoe.training.loop import make_forward_step

        def device_batches(direction):
            for batch in self._batches(direction):
                out = {k: batch[k].to(platform.device()) for k in _MODEL_KEYS}
                out["loss_mask"] = batch["loss_mask"].to(platform.device())
                yield out

        return pipeline.validation_losses(
            self.trainer.built.model, {d: list(device_batches(d)) for d in self.data.directions},
            make_forward_step(self.trainer.model_cfg), self.trainer.built.pg_collection)

    def _routing_summary(self, model) -> dict:
        """Per layer: each task's share of its routed tokens per expert (or adapter), from the validation pass.

        Under tensor parallelism each rank routes its sequence shard, so counts are summed over the TP group; under
        pipeline parallelism each stage holds some layers, named here as in the whole model and gathered."""
        stats = routing_stats(model)
        all_reduce_routing_stats(stats, group=self.trainer.built.pg_collection.tp)
        if self.pipelined:
            pp = self.trainer.built.pg_collection.pp
            mine = {model.whole_model_name(name): {k: v.cpu() for k, v in entry.items()}
                    for name, entry in stats.items()}
            gathered: list = [None] * pp.size()
            torch.distributed.all_gather_object(gathered, mine, group=pp)
            stats = {name: entry for stage_stats in gathered for name, entry in stage_stats.items()}
        names = self.trainer.corpus.manifest["task_map"]["tasks"]
        summary = {}
        for module_name, entry in stats.items():
            counts_GX = entry.get("expert_assignments", entry.get("adapter_assignments")).float().cpu()
            share_GX = counts_GX / counts_GX.sum(dim=1, keepdim=True).clamp(min=1)
            kind = "experts" if "expert_assignments" in entry else "adapters"
            rows = {names[g] if g < len(names) else str(g): [round(float(x), 4) for x in share_GX[g]]
                    for g in range(share_GX.shape[0]) if counts_GX[g].sum() > 0}
            summary[module_name] = {"kind": kind, "share": rows}
        return summary

    @torch.no_grad()
    def run(self) -> dict:
        model = self.trainer.built.module
        was_training = model.training
        model.eval()
        set_routing_stats(model, True)
        try:
            loss = self._pipeline_losses() if self.pipelined else {}
            bleu, chrf = {}, {}
            for direction in self.data.directions:
                loss_sum, tokens, hyps, refs = 0.0, 0.0, [], []
                for batch in self._batches(direction):
                    if not self.pipelined:
                        dev_batch = {k: batch[k].to(platform.device()) for k in _MODEL_KEYS}
                        loss_BT = model(**dev_batch)
                        mask = batch["loss_mask"].to(loss_BT.device)
                        loss_sum += float((loss_BT.float() * mask).sum())
                        tokens += float(mask.sum())
                    pause_routing_stats(model, True)  # decoding routes its own tokens: keep it out of the statistics
                    hyps.extend(self.sp.decode(ids) for ids in self.translate(batch))
                    pause_routing_stats(model, False)
                    for labels, m in zip(batch["labels"], batch["loss_mask"]):
                        ids = [t for t in labels[m.bool()].tolist() if t not in (EOS_ID, BOS_ID)]
                        refs.append(self.sp.decode(ids))
                score = score_corpus(hyps, refs)
                if not self.pipelined:
                    loss[direction] = loss_sum / max(tokens, 1.0)
                bleu[direction], chrf[direction] = score.bleu, score.chrf
            return {"loss": loss, "bleu": bleu, "chrf": chrf, "loss_avg": mean(loss.values()),
                    "bleu_avg": mean(bleu.values()), "chrf_avg": mean(chrf.values()),
                    "routing": self._routing_summary(model)}
        finally:
            set_routing_stats(model, False)
            model.train(was_training)
