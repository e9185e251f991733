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

The validator is built from its collaborators (the trainer's `build_validator` assembles them): the model, the
forward step the training uses (`training/forward.py`), the process groups, the search config (`eval.search`), the
validation set (`ValidationSet`: sentences, tokenizer, references) and the metrics writer.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import sentencepiece as spm
import torch

from megatron_taskmoe.data.batching import BatchingConfig, collate, model_inputs, to_device
from megatron_taskmoe.data.dataset import MultilingualDataset
from megatron_taskmoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, language_tag_ids
from megatron_taskmoe.evaluation import mean, score_corpus
from megatron_taskmoe.generation import SearchConfig
from megatron_taskmoe.model.decoding import translate_batch
from megatron_taskmoe.model.moe import (all_reduce_routing_stats, pause_routing_stats, routing_stats,
                                        set_routing_stats)
from megatron_taskmoe.parallel import groups, pipeline
from megatron_taskmoe.parallel.pipeline_decoding import pipelined_translate_batch
from megatron_taskmoe.training.forward import ForwardStep, run_forward_step
from megatron_taskmoe.training.metrics import MetricsWriter

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ValidationSet:
    """The sentences validated on: the first `max_sentences` pairs of each direction of a split, in deterministic
    length-sorted batches, with their raw reference text."""

    dataset: MultilingualDataset
    """The split's indexed pairs (directions that have the split)."""
    tokenizer: spm.SentencePieceProcessor
    """The corpus' SentencePiece model: decodes the translations (and the references without raw text)."""
    references: dict[str, Optional[list[str]]]
    """Per direction, the raw target text of its pairs (None: data preprocessed without it)."""
    target_langs: dict[str, str]
    """Per direction, its target language (chooses the sacrebleu tokenizer)."""
    max_sentences: int
    """Pairs validated per direction (the first ones, in corpus order)."""
    batching: BatchingConfig
    """The token budget (or sentence count) and padding of the batches."""

    @classmethod
    def load(cls, corpus, split: str, *, max_src_len: int, max_tgt_len: int, max_sentences: int,
             batching: BatchingConfig, warn: bool = True) -> "ValidationSet":
        """The split of a `training.setup.Corpus`, over its directions that have the split; `warn`: log the
        directions without raw references."""
        directions = [d for d in corpus.directions if split in corpus.manifest["directions"][d]["splits"]]
        if not directions:
            raise ValueError(f"{corpus.data_dir}: no direction has a {split!r} split to validate on")
        dataset = MultilingualDataset(corpus.data_dir, split, directions, max_src_len=max_src_len,
                                      max_tgt_len=max_tgt_len)
        references = {}
        for d in directions:
            name = corpus.manifest["directions"][d]["splits"][split].get("references")
            if name is None:
                if warn:
                    log.warning("%s has no raw references for %s %s (preprocessed by an older "
                                "tools/preprocess_data.py): validation BLEU is scored against the decoded target "
                                "pieces", corpus.data_dir, split, d)
                references[d] = None
                continue
            lines = (Path(corpus.data_dir) / name).read_text(encoding="utf-8").split("\n")
            references[d] = lines[:-1] if lines and lines[-1] == "" else lines
        return cls(dataset=dataset, tokenizer=spm.SentencePieceProcessor(model_file=str(corpus.tokenizer_path)),
                   references=references,
                   target_langs={d: corpus.manifest["directions"][d]["tgt"] for d in directions},
                   max_sentences=max_sentences, batching=batching)

    @property
    def directions(self) -> list[str]:
        return self.dataset.directions

    def batches(self, direction: str) -> Iterator[dict]:
        """Length-sorted batches of the direction's first max_sentences sentences (deterministic)."""
        for _, batch in self.indexed_batches(direction):
            yield batch

    def indexed_batches(self, direction: str) -> Iterator[tuple[list[int], dict]]:
        """(item indexes within the direction, batch) of `batches`."""
        data = self.dataset
        d = data.directions.index(direction)
        lo = int(data.offsets_D[d])
        n = min(int(data.sizes_D[d]), self.max_sentences)
        order = np.argsort(data.src_lengths_N[lo:lo + n], kind="stable")
        budget, size = self.batching.max_tokens, self.batching.batch_size
        start = 0
        while start < n:
            end = start + 1
            while end < n:
                if size is not None:
                    if end - start + 1 > size:
                        break
                else:
                    longest = max(data.src_lengths_N[lo + order[end]], data.tgt_lengths_N[lo + order[end]])
                    if longest * (end - start + 1) > budget:
                        break
                end += 1
            yield [int(i) for i in order[start:end]], collate([data[lo + int(i)] for i in order[start:end]],
                                                               self.batching)
            start = end

    def references_of(self, direction: str, items: list[int], batch: dict) -> list[str]:
        """References of a batch's rows: the raw text, or the decoded target pieces when there is none."""
        raw = self.references[direction]
        if raw is not None:
            return [raw[i] for i in items]
        return [self.tokenizer.decode([t for t in labels[m.bool()].tolist() if t not in (EOS_ID, BOS_ID)])
                for labels, m in zip(batch["labels"], batch["loss_mask"])]


class Validator:
    """Validation of a model on a `ValidationSet`: losses, BLEU/chrF, routing shares (see the module docstring).

    `model` is what megatron's schedules run (this rank's stage, wrapped for data parallelism) and `module` the bare
    model (decoding, eval mode, routing statistics); `make_forward_step(label_smoothing)` gives the training's
    forward step (training/forward.py); `pg_collection` the process groups (tp, pp, ...); `task_names` name the
    routing rows. `validate(step)` writes the `eval` record to `metrics` and logs it on the logging rank."""

    def __init__(self, *, model: torch.nn.Module, module: torch.nn.Module,
                 make_forward_step: Callable[[Optional[float]], ForwardStep], pg_collection, search: SearchConfig,
                 data: ValidationSet, task_names: list[str], bleu_tokenize: Optional[str] = None,
                 metrics: Optional[MetricsWriter] = None, logging_rank: bool = True):
        self.model, self.module = model, module
        self.make_forward_step = make_forward_step
        self.pg_collection = pg_collection
        self.search = search
        self.data = data
        self.task_names = task_names
        self.bleu_tokenize = bleu_tokenize
        self.metrics = metrics
        self.logging_rank = logging_rank
        self.banned = sorted({PAD_ID, BOS_ID, UNK_ID, *language_tag_ids(data.tokenizer)})

    @property
    def pipelined(self) -> bool:
        return self.pg_collection.pp.size() > 1

    def translate(self, batch: dict) -> list[list[int]]:
        """Token ids of the translations of a collated batch (no bos/eos); the same on every rank."""
        if not self.pipelined:
            return translate_batch(self.module, batch, self.search, bos=BOS_ID, eos=EOS_ID, banned=self.banned,
                                   device=groups.device())
        return pipelined_translate_batch(self.module, model_inputs(batch), self.search, self.pg_collection.pp,
                                         bos=BOS_ID, eos=EOS_ID, banned=self.banned)

    def hypotheses(self, direction: str) -> list[list[int]]:
        """Token ids of the translations of `direction`'s validation sentences, in `ValidationSet.batches` order
        (the model must be in eval mode)."""
        return [ids for batch in self.data.batches(direction) for ids in self.translate(batch)]

    def _pipeline_losses(self, label_smoothing: Optional[float] = None) -> dict[str, float]:
        """Mean token loss per direction, forward-only through the pipeline stages (`label_smoothing` 0.0: NLL)."""
        device = groups.device()
        return pipeline.validation_losses(
            self.model, {d: [to_device(b, device) for b in self.data.batches(d)] for d in self.data.directions},
            self.make_forward_step(label_smoothing), self.pg_collection)

    def _routing_summary(self) -> dict:
        """Per layer: each task's share of its routed tokens per expert (or adapter), from the validation pass.

        Under tensor parallelism each rank routes its sequence shard, so counts are summed over the TP group; under
        pipeline parallelism each stage holds some layers, named here as in the whole model and gathered."""
        stats = routing_stats(self.module)
        all_reduce_routing_stats(stats, group=self.pg_collection.tp)
        if self.pipelined:
            pp = self.pg_collection.pp
            mine = {self.module.whole_model_name(name): {k: v.cpu() for k, v in entry.items()}
                    for name, entry in stats.items()}
            gathered: list = [None] * pp.size()
            torch.distributed.all_gather_object(gathered, mine, group=pp)
            stats = {name: entry for stage_stats in gathered for name, entry in stage_stats.items()}
        names = self.task_names
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
        """Validate once: per direction loss (label-smoothed), NLL, perplexity, BLEU, chrF and their averages, the
        sacrebleu signatures and the routing summary; the same on every rank."""
        model = self.module
        was_training = model.training
        model.eval()
        set_routing_stats(model, True)
        device = groups.device()
        smoothed_step, nll_step = self.make_forward_step(None), self.make_forward_step(0.0)
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
                for items, batch in self.data.indexed_batches(direction):
                    if not self.pipelined:
                        dev_batch = to_device(batch, device)
                        loss_sum, tokens = run_forward_step(smoothed_step, model, dev_batch)
                        sums["loss"] += loss_sum
                        pause_routing_stats(model, True)  # the same tokens again: count them once
                        sums["nll"] += run_forward_step(nll_step, model, dev_batch)[0]
                        pause_routing_stats(model, False)
                        sums["tokens"] += tokens
                    pause_routing_stats(model, True)  # decoding routes its own tokens: keep it out of the statistics
                    hyps.extend(self.data.tokenizer.decode(ids) for ids in self.translate(batch))
                    pause_routing_stats(model, False)
                    refs.extend(self.data.references_of(direction, items, batch))
                score = score_corpus(hyps, refs, tgt_lang=self.data.target_langs[direction],
                                     tokenize=self.bleu_tokenize)
                if not self.pipelined:
                    loss[direction] = sums["loss"] / max(sums["tokens"], 1.0)
                    nll[direction] = sums["nll"] / max(sums["tokens"], 1.0)
                bleu[direction], chrf[direction] = score.bleu, score.chrf
                signatures[direction] = score.signature
            return {"loss": loss, "nll": nll, "ppl": {d: math.exp(min(v, 100.0)) for d, v in nll.items()},
                    "bleu": bleu, "chrf": chrf, "loss_avg": mean(loss.values()), "nll_avg": mean(nll.values()),
                    "bleu_avg": mean(bleu.values()), "chrf_avg": mean(chrf.values()),
                    "bleu_signature": signatures, "routing": self._routing_summary()}
        finally:
            set_routing_stats(model, False)
            model.train(was_training)

    def validate(self, step: int) -> dict:
        """`run`, with its record written to the metrics (`eval` at `step`) and a summary line logged."""
        results = self.run()
        if self.metrics is not None:
            self.metrics.write("eval", step, **results)
        if self.logging_rank:
            log.info("step %d validation: loss %.4f (label-smoothed), NLL %.4f (ppl %.2f), BLEU %.2f (%s)", step,
                     results["loss_avg"], results["nll_avg"], math.exp(min(results["nll_avg"], 100.0)),
                     results["bleu_avg"], json.dumps({k: round(v, 2) for k, v in results["bleu"].items()}))
        return results
