"""On-the-fly validation per task: loss, and sacrebleu BLEU/chrF of greedy or beam-search translations.

Every rank evaluates the same sentences in lockstep. That is what expert and tensor parallelism need (each forward is
collective over the experts' and tensors' groups) and it makes the result identical on all ranks, so any rank can
decide on early stopping. Validation sets are small (`eval.max_sentences` per direction), so the duplicated work
across data-parallel ranks is cheap.

Translations are decoded incrementally (`model/decoding.py`: key/value caches, vectorised beam search), as
`tools/translate.py` decodes, and scored against the raw reference text that `tools/preprocess_data.py` keeps beside
the indexed data (`references` in the manifest), as `tools/evaluate.py` scores test text; for a data directory
without them the references are the targets decoded from their (possibly truncated) pieces, with a warning. BLEU
uses the target language's sacrebleu tokenizer (`evaluation.bleu_tokenizer`), the same for early stopping and the
best checkpoint. The loss is reported twice: label-smoothed (the training objective) and as the plain NLL with its
perplexity.

With pipeline parallelism the loss goes forward-only through megatron's 1F1B schedule and the translations through
the stages one decoding step at a time (`parallel/pipeline_decoding.py`); each stage counts the routing of its own
layers and the counts are gathered over the pipeline group, so the record is the same as without pipelining.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import sentencepiece as spm
import torch

from megatron_taskmoe.data.batching import collate, BatchingConfig
from megatron_taskmoe.data.dataset import MultilingualDataset
from megatron_taskmoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, language_tag_ids
from megatron_taskmoe.evaluation import mean, score_corpus
from megatron_taskmoe.generation import SearchConfig
from megatron_taskmoe.model.decoding import translate_batch
from megatron_taskmoe.model.moe import (all_reduce_routing_stats, pause_routing_stats, routing_stats,
                                        set_routing_stats)
from megatron_taskmoe.parallel import groups

if TYPE_CHECKING:
    from megatron_taskmoe.training.loop import Trainer

log = logging.getLogger(__name__)

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
        self.bleu_tokenize = cfg.eval.bleu_tokenize
        self.references = {d: self._raw_references(corpus, d, cfg.data.valid_split) for d in directions}

    def _raw_references(self, corpus, direction: str, split: str) -> Optional[list[str]]:
        """The raw target text of the direction's validation pairs, or None for data preprocessed without it."""
        name = corpus.manifest["directions"][direction]["splits"][split].get("references")
        if name is None:
            if self.trainer.rank == 0:
                log.warning("%s has no raw references for %s %s (preprocessed by an older tools/preprocess_data.py): "
                            "validation BLEU is scored against the decoded target pieces", corpus.data_dir,
                            split, direction)
            return None
        lines = (Path(corpus.data_dir) / name).read_text(encoding="utf-8").split("\n")
        return lines[:-1] if lines and lines[-1] == "" else lines

    def _batches(self, direction: str):
        """Length-sorted batches of the direction's first max_sentences sentences (deterministic)."""
        for _, batch in self._indexed_batches(direction):
            yield batch

    def _indexed_batches(self, direction: str):
        """(item indexes within the direction, batch) of `_batches`."""
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
            yield [int(i) for i in order[start:end]], collate([self.data[lo + int(i)] for i in order[start:end]],
                                                               self.batching)
            start = end

    @property
    def pipelined(self) -> bool:
        return self.trainer.cfg.parallel.pipeline > 1

    def translate(self, batch: dict) -> list[list[int]]:
        """Token ids of the translations of a collated batch (no bos/eos); the same on every rank."""
        model = self.trainer.built.module
        if not self.pipelined:
            return translate_batch(model, batch, self.search, bos=BOS_ID, eos=EOS_ID, banned=self.banned,
                                   device=groups.device())
        from megatron_taskmoe.parallel.pipeline_decoding import pipelined_translate_batch

        return pipelined_translate_batch(model, {k: batch[k] for k in _MODEL_KEYS}, self.search,
                                         self.trainer.built.pg_collection.pp, bos=BOS_ID, eos=EOS_ID,
                                         banned=self.banned)

    def hypotheses(self, direction: str) -> list[list[int]]:
        """Token ids of the translations of `direction`'s validation sentences, in `_batches` order (the model
        must be in eval mode)."""
        return [ids for batch in self._batches(direction) for ids in self.translate(batch)]

    def _pipeline_losses(self, label_smoothing: Optional[float] = None) -> dict[str, float]:
        """Mean token loss per direction, forward-only through the pipeline stages (`label_smoothing` 0.0: NLL)."""
        from megatron_taskmoe.parallel import pipeline
        from megatron_taskmoe.training.loop import make_forward_step

        def device_batches(direction):
            for batch in self._batches(direction):
                out = {k: batch[k].to(groups.device()) for k in _MODEL_KEYS}
                out["loss_mask"] = batch["loss_mask"].to(groups.device())
                yield out

        return pipeline.validation_losses(
            self.trainer.built.model, {d: list(device_batches(d)) for d in self.data.directions},
            make_forward_step(self.trainer.model_cfg, label_smoothing), self.trainer.built.pg_collection)

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

    def corpus_target(self, direction: str) -> str:
        return self.trainer.corpus.manifest["directions"][direction]["tgt"]

    def _references(self, direction: str, items: list[int], batch: dict) -> list[str]:
        """References of a batch's rows: the raw text, or the decoded target pieces when there is none."""
        raw = self.references[direction]
        if raw is not None:
            return [raw[i] for i in items]
        return [self.sp.decode([t for t in labels[m.bool()].tolist() if t not in (EOS_ID, BOS_ID)])
                for labels, m in zip(batch["labels"], batch["loss_mask"])]

    @torch.no_grad()
    def run(self) -> dict:
        model = self.trainer.built.module
        was_training = model.training
        model.eval()
        set_routing_stats(model, True)
        try:
            if self.pipelined:
                loss = self._pipeline_losses()
                pause_routing_stats(model, True)  # the same tokens again: count them once
                nll = self._pipeline_losses(label_smoothing=0.0)
                pause_routing_stats(model, False)
            else:
                loss, nll = {}, {}
            bleu, chrf, signatures = {}, {}, {}
            for direction in self.data.directions:
                sums = {"loss": 0.0, "nll": 0.0, "tokens": 0.0}
                hyps, refs = [], []
                for items, batch in self._indexed_batches(direction):
                    if not self.pipelined:
                        dev_batch = {k: batch[k].to(groups.device()) for k in _MODEL_KEYS}
                        mask = batch["loss_mask"].to(groups.device())
                        sums["loss"] += float((model(**dev_batch).float() * mask).sum())
                        pause_routing_stats(model, True)  # the same tokens again: count them once
                        sums["nll"] += float((model(**dev_batch, label_smoothing=0.0).float() * mask).sum())
                        pause_routing_stats(model, False)
                        sums["tokens"] += float(mask.sum())
                    pause_routing_stats(model, True)  # decoding routes its own tokens: keep it out of the statistics
                    hyps.extend(self.sp.decode(ids) for ids in self.translate(batch))
                    pause_routing_stats(model, False)
                    refs.extend(self._references(direction, items, batch))
                score = score_corpus(hyps, refs, tgt_lang=self.corpus_target(direction), tokenize=self.bleu_tokenize)
                if not self.pipelined:
                    loss[direction] = sums["loss"] / max(sums["tokens"], 1.0)
                    nll[direction] = sums["nll"] / max(sums["tokens"], 1.0)
                bleu[direction], chrf[direction] = score.bleu, score.chrf
                signatures[direction] = score.signature
            return {"loss": loss, "nll": nll, "ppl": {d: math.exp(min(v, 100.0)) for d, v in nll.items()},
                    "bleu": bleu, "chrf": chrf, "loss_avg": mean(loss.values()), "nll_avg": mean(nll.values()),
                    "bleu_avg": mean(bleu.values()), "chrf_avg": mean(chrf.values()),
                    "bleu_signature": signatures, "routing": self._routing_summary(model)}
        finally:
            set_routing_stats(model, False)
            model.train(was_training)
