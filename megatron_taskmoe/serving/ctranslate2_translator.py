"""Translating with an exported CTranslate2 model, and checking it against the model it came from.

`Ct2Translator` prepares sources exactly as `inference.Translator` and `reference.ReferenceTranslator` do (the
`<2tgt>` tag, the sentencepiece pieces truncated to the model's positions; CTranslate2 appends eos itself), batches
them in length order and decodes with CTranslate2's beam search under our decoders' rule: pad, bos, unk and every
`<2xx>` tag are never produced (`banned_ids`, as `Tokenizer.banned_ids`; CTranslate2 is asked with `disable_unk` and
one-piece `suppress_sequences`). CTranslate2 removes them from the logits before its softmax where ours sets their
log-probabilities to -inf after it: greedy choices are the same, beam scores are renormalised over the allowed
pieces. The output length limit is `max_len_a * source length + max_len_b` capped by the learned positions, as
ours; CTranslate2 takes one limit per call, so a batch runs to its longest sentence's limit (per-sentence limits
would split the batches) and greedy outputs are then cut at each sentence's own limit, which makes them exactly what
a per-sentence limit gives; beam outputs keep the batch's limit.

`verify` runs the reference model (`reference/model.py`, the MoE model itself, whose outputs equal the trained
model's) and a float32 CTranslate2 model on the same sources:
  * greedy outputs, with each sentence's own length limit (sentences are grouped by limit on the CTranslate2 side)
    and the same banned pieces on both sides, must be identical; a difference is accepted only as a tie: at the
    first differing position the two tokens' log-probabilities under the reference model differ by at most
    `tolerance` (fp32 rounding can then pick either);
  * teacher-forced token log-probabilities (CTranslate2's `score_batch` against the reference's log-softmax) of the
    references (or of the greedy outputs when there are none) must differ by at most `tolerance`;
  * optionally a quantized model is compared the same way and reported (agreement, not judged: int8 changes the
    function).

Legend: B batch, S source length, T target length, V vocabulary, N sentences.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import ctranslate2
import sentencepiece as spm
import torch

from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
from megatron_taskmoe.data.bitext import DataError, discover_bitexts, read_bitext
from megatron_taskmoe.data.tokenizer import language_tag_ids
from megatron_taskmoe.generation import SearchConfig, beam_search
from megatron_taskmoe.reference.model import ReferenceDecoder
from megatron_taskmoe.serving.ctranslate2_export import FORMAT, SERVING_FILE, TOKENIZER_FILE, check_directory
from megatron_taskmoe.serving.source import ReferenceSource

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ translator
def banned_ids(sp: spm.SentencePieceProcessor, special_ids: dict) -> list[int]:
    """Ids a translation never contains, as `Tokenizer.banned_ids`: pad, bos, unk and every `<2xx>` tag."""
    return sorted({special_ids["pad"], special_ids["bos"], special_ids["unk"], *language_tag_ids(sp)})


class Ct2Translator:
    """Batched translation of raw sentences with a model written by `tools/checkpoint/export_ctranslate2.py`."""

    def __init__(self, directory: str | os.PathLike, *, beam_size: int = 4, length_penalty: float = 1.0,
                 max_len_a: float = 1.2, max_len_b: int = 10, batch_size: int = 32, device: str = "cpu",
                 compute_type: str = "default", intra_threads: int = 0, inter_threads: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.directory = check_directory(directory)
        self.record = json.loads((self.directory / SERVING_FILE).read_text(encoding="utf-8"))
        if self.record.get("format") != FORMAT:
            raise CheckpointToolError(f"{self.directory / SERVING_FILE}: format {self.record.get('format')!r}, "
                                      f"expected {FORMAT!r}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.directory / TOKENIZER_FILE))
        self.pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        self.piece_id = {p: i for i, p in enumerate(self.pieces)}
        special = self.record["special_ids"]
        self.banned = banned_ids(self.sp, special)
        # CTranslate2's vocabulary is these pieces in id order: unk by its own switch, the others as sequences
        self.suppressed = [[self.pieces[i]] for i in self.banned if i != special["unk"]]
        self.search = SearchConfig(beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
                                   max_len_b=max_len_b)
        self.batch_size = batch_size
        self.max_src_pieces = self.record["max_source_positions"] - 2  # room for <2tgt> and eos
        self.max_tgt_pieces = self.record["max_target_positions"] - 1  # room for bos / eos
        self.translator = ctranslate2.Translator(str(self.directory), device=device, compute_type=compute_type,
                                                 intra_threads=intra_threads, inter_threads=inter_threads)

    @property
    def directions(self) -> list[str]:
        return sorted(self.record["directions"])

    def prefix(self, src_lang: str, tgt_lang: str) -> list[str]:
        name = f"{src_lang}-{tgt_lang}"
        if name not in self.record["directions"]:
            raise ValueError(f"direction {name} is not served by {self.directory} (it serves "
                             f"{', '.join(self.directions)})")
        return list(self.record["directions"][name]["source_prefix"])

    def source_tokens(self, piece_ids: Sequence[Sequence[int]], src_lang: str, tgt_lang: str) -> list[list[str]]:
        """CTranslate2's source tokens of tokenized sentences: the tag, then the pieces (eos is CTranslate2's)."""
        prefix = self.prefix(src_lang, tgt_lang)
        return [prefix + [self.pieces[i] for i in ids[: self.max_src_pieces]] for ids in piece_ids]

    def limits(self, tokens: Sequence[Sequence[str]]) -> list[int]:
        """Per-sentence output limits, as ours: a * (source length with tag and eos) + b, within the positions."""
        return self.search.max_lengths([len(t) + 1 for t in tokens], self.max_tgt_pieces)

    def _ids(self, hypothesis: Sequence[str]) -> list[int]:
        return [self.piece_id[p] for p in hypothesis]

    def translate_tokens(self, tokens: Sequence[Sequence[str]], *, beam_size: Optional[int] = None,
                         max_length: Optional[int] = None, return_scores: bool = False):
        """One CTranslate2 call over prepared sources (max_length: the batch's limit, default the longest); the
        banned pieces are never produced."""
        max_length = max_length or max(self.limits(tokens))
        return self.translator.translate_batch(
            [list(t) for t in tokens], beam_size=beam_size or self.search.beam_size,
            length_penalty=self.search.length_penalty, max_decoding_length=max_length, return_scores=return_scores,
            disable_unk=True, suppress_sequences=self.suppressed,
            min_decoding_length=0, max_batch_size=0)  # ours may end at once (CTranslate2's default minimum is 1)

    def translate_piece_ids(self, piece_ids: Sequence[Sequence[int]], src_lang: str, tgt_lang: str
                            ) -> list[list[int]]:
        tokens = self.source_tokens(piece_ids, src_lang, tgt_lang)
        order = sorted(range(len(tokens)), key=lambda i: (len(tokens[i]), i))
        out: list[Optional[list[int]]] = [None] * len(tokens)
        limits = self.limits(tokens)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            results = self.translate_tokens([tokens[i] for i in chunk])
            for pos, result in zip(chunk, results):
                ids = self._ids(result.hypotheses[0])
                # greedy: the first L tokens do not depend on the limit, so cutting at the sentence's own limit
                # gives exactly what a search with that limit gives
                out[pos] = ids[: limits[pos]] if self.search.beam_size == 1 else ids
        return out

    def translate_ids(self, sentences: Sequence[str], src_lang: str, tgt_lang: str) -> list[list[int]]:
        self.prefix(src_lang, tgt_lang)
        pieces = self.sp.encode(list(sentences), out_type=int)
        truncated = sum(len(p) > self.max_src_pieces for p in pieces)
        if truncated:
            log.warning("%d source sentence(s) longer than %d pieces truncated (the model's positions)", truncated,
                        self.max_src_pieces)
        return self.translate_piece_ids(pieces, src_lang, tgt_lang)

    def translate(self, sentences: Sequence[str], src_lang: str, tgt_lang: str) -> list[str]:
        """Detokenized translations of `sentences`, in their order."""
        return [self.sp.decode(ids) for ids in self.translate_ids(sentences, src_lang, tgt_lang)]


# ------------------------------------------------------------------------------------------------ test sets
@dataclass(kw_only=True)
class TestSet:
    """Tokenized sentences of one direction (piece ids without tag/eos); targets optional."""

    direction: str
    """The direction, e.g. "de-en"."""
    sources: list[list[int]]
    """Source piece ids, one list per sentence."""
    targets: Optional[list[list[int]]] = None
    """Reference piece ids, one list per sentence, or None."""


def synthetic_test_sets(source: ReferenceSource, directions: Sequence[str], *, sentences: int = 32,
                        max_len: int = 20, seed: int = 0) -> list[TestSet]:
    """Random piece sequences (no special ids, no language tags), the same for every direction: a test set for
    models without data at hand. Deterministic given the seed."""
    config = source.config
    excluded = set(config.special_ids.values()) | set(config.language_tags.values())
    ordinary = [i for i in range(config.model.vocab_size) if i not in excluded]
    longest = max(1, min(max_len, config.model.max_source_positions - 2))
    rng = random.Random(seed)
    rows = [[rng.choice(ordinary) for _ in range(rng.randint(1, longest))] for _ in range(sentences)]
    return [TestSet(direction=d, sources=[list(r) for r in rows]) for d in directions]


def bitext_test_sets(source: ReferenceSource, directions: Sequence[str], data: Path, split: str,
                     sentences: Optional[int]) -> list[TestSet]:
    """The first `sentences` pairs of each served direction in a raw bitext directory (as tools/evaluate.py
    reads it); CheckpointToolError naming the directory when a direction has none."""
    try:
        bitexts = discover_bitexts(data, splits=[split])
    except DataError as e:
        raise CheckpointToolError(f"--verify-data {data}: {e}") from None
    pairs: dict[str, tuple[list[str], list[str]]] = {}
    for b in bitexts:
        try:
            src, tgt = read_bitext(b)
        except DataError as e:
            raise CheckpointToolError(f"--verify-data: {e}") from None
        pairs[f"{b.src}-{b.tgt}"] = (src, tgt)
        pairs[f"{b.tgt}-{b.src}"] = (tgt, src)
    missing = [d for d in directions if d not in pairs]
    if missing:
        raise CheckpointToolError(f"--verify-data {data}: no {split!r} bitext for {', '.join(missing)} (has "
                                  f"{', '.join(sorted(pairs)) or 'none'})")
    sp = spm.SentencePieceProcessor(model_proto=source.tokenizer)
    out = []
    for d in directions:
        src, tgt = pairs[d]
        if sentences is not None:
            src, tgt = src[:sentences], tgt[:sentences]
        out.append(TestSet(direction=d, sources=sp.encode(src, out_type=int), targets=sp.encode(tgt, out_type=int)))
    return out


# ------------------------------------------------------------------------------------------------ reference side
class ReferenceRunner:
    """The reference model's greedy outputs (pad, bos, unk and the tags banned) and teacher-forced log-probabilities,
    with our source preparation."""

    def __init__(self, source: ReferenceSource, batch_size: int = 32):
        self.model = source.model()
        self.config = source.config
        self.batch_size = batch_size
        self.banned = banned_ids(spm.SentencePieceProcessor(model_proto=source.tokenizer), source.config.special_ids)
        arch = source.config.model
        self.max_src_pieces, self.max_tgt_pieces = arch.max_source_positions - 2, arch.max_target_positions - 1

    def rows(self, test: TestSet) -> tuple[list[list[int]], dict]:
        src, tgt = test.direction.split("-", 1)
        ids = self.config.direction(src, tgt)
        eos = self.config.special_ids["eos"]
        return [[ids["tag_id"], *p[: self.max_src_pieces], eos] for p in test.sources], ids

    def _encode(self, rows: list[list[int]], ids: dict):
        pad = self.config.special_ids["pad"]
        b, s = len(rows), max(len(r) for r in rows)
        src_BS = torch.full((b, s), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            src_BS[i, : len(row)] = torch.tensor(row)
        padding_BS = torch.arange(s)[None, :] >= torch.tensor([len(r) for r in rows])[:, None]
        return self.model.encode(src_BS, padding_BS, task_ids=torch.full((b,), ids["task_id"]),
                                 tgt_lang_ids=torch.full((b,), ids["tgt_lang_id"]))

    def greedy(self, test: TestSet, search: SearchConfig) -> list[list[int]]:
        rows, ids = self.rows(test)
        special = self.config.special_ids
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        out: list[Optional[list[int]]] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = [rows[i] for i in chunk]
            hyps = beam_search(ReferenceDecoder(self.model, self._encode(batch, ids), 1), batch_size=len(batch),
                               bos=special["bos"], eos=special["eos"],
                               max_lengths=search.max_lengths([len(r) for r in batch], self.max_tgt_pieces),
                               beam_size=1, banned=self.banned)
            for pos, hyp in zip(chunk, hyps):
                out[pos] = hyp
        return out

    @torch.no_grad()
    def token_logprobs(self, test: TestSet, targets: list[list[int]]) -> list[torch.Tensor]:
        """log p(y_t | y_<t, x) of every target token and the final eos, per sentence (fp32 [T + 1])."""
        rows, ids = self.rows(test)
        special = self.config.special_ids
        out = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            tgts = [t[: self.max_tgt_pieces] for t in targets[start : start + self.batch_size]]
            enc = self._encode(batch, ids)
            t_max = max(len(t) for t in tgts) + 1
            tgt_in = torch.full((len(batch), t_max), special["pad"], dtype=torch.long)
            labels = torch.full((len(batch), t_max), special["pad"], dtype=torch.long)
            for i, t in enumerate(tgts):
                tgt_in[i, : len(t) + 1] = torch.tensor([special["bos"], *t])
                labels[i, : len(t) + 1] = torch.tensor([*t, special["eos"]])
            padding = torch.arange(t_max)[None, :] >= torch.tensor([len(t) + 1 for t in tgts])[:, None]
            logp_BTV = torch.log_softmax(self.model._decode(enc, tgt_in, padding).float(), dim=-1)
            picked_BT = logp_BTV.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            out.extend(picked_BT[i, : len(t) + 1] for i, t in enumerate(tgts))
        return out


# ------------------------------------------------------------------------------------------------ verification
def _first_difference(a: list[int], b: list[int]) -> int:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return min(len(a), len(b))


def _is_tie(runner: ReferenceRunner, test: TestSet, index: int, ours: list[int], theirs: list[int],
            tolerance: float) -> tuple[bool, float]:
    """Whether the two greedy outputs part at a near-tie of the reference model; (tie, log-prob gap)."""
    eos = runner.config.special_ids["eos"]
    j = _first_difference(ours, theirs)
    a = ours[j] if j < len(ours) else eos
    b = theirs[j] if j < len(theirs) else eos
    single = TestSet(direction=test.direction, sources=[test.sources[index]])
    rows, ids = runner.rows(single)
    enc = runner._encode(rows, ids)
    prefix = torch.tensor([[runner.config.special_ids["bos"], *ours[:j]]])
    logp_V = runner.model.decode_step(enc, prefix, torch.zeros(1, dtype=torch.long))[0]
    gap = abs(float(logp_V[a]) - float(logp_V[b]))
    return gap <= tolerance, gap


def compare(runner: ReferenceRunner, translator: Ct2Translator, tests: Sequence[TestSet], *,
            tolerance: float, ours: Optional[dict[str, list[list[int]]]] = None) -> dict:
    """Greedy outputs and teacher-forced scores of the reference model vs one CTranslate2 model (see the module
    docstring). `ours`: the reference's greedy outputs when already computed."""
    search = SearchConfig(beam_size=1, max_len_a=translator.search.max_len_a, max_len_b=translator.search.max_len_b)
    identical = ties = different = 0
    examples = []
    score_diffs = []
    ours = dict(ours or {})
    for test in tests:
        src, tgt = test.direction.split("-", 1)
        if test.direction not in ours:
            ours[test.direction] = runner.greedy(test, search)
        tokens = translator.source_tokens(test.sources, src, tgt)
        limits = translator.limits(tokens)
        theirs: list[Optional[list[int]]] = [None] * len(tokens)
        for limit in sorted(set(limits)):
            idx = [i for i, n in enumerate(limits) if n == limit]
            for start in range(0, len(idx), translator.batch_size):
                part = idx[start : start + translator.batch_size]
                results = translator.translate_tokens([tokens[i] for i in part], beam_size=1, max_length=limit)
                for i, r in zip(part, results):
                    theirs[i] = translator._ids(r.hypotheses[0])
        for i, (a, b) in enumerate(zip(ours[test.direction], theirs)):
            if a == b:
                identical += 1
                continue
            tie, gap = _is_tie(runner, test, i, a, b, tolerance)
            ties += tie
            different += not tie
            if len(examples) < 3:
                examples.append({"direction": test.direction, "sentence": i, "reference": a, "ctranslate2": b,
                                 "logprob_gap_at_first_difference": gap})
        targets = test.targets if test.targets is not None else ours[test.direction]
        targets = [t[: runner.max_tgt_pieces] for t in targets]
        ref_logp = runner.token_logprobs(test, targets)
        scored = translator.translator.score_batch(tokens, [[translator.pieces[i] for i in t] for t in targets],
                                                   max_batch_size=translator.batch_size)
        for r, s in zip(ref_logp, scored):
            theirs_logp = torch.tensor(s.log_probs, dtype=torch.float32)
            if theirs_logp.shape != r.shape:
                raise CheckpointToolError(f"{translator.directory}: CTranslate2 scored {theirs_logp.numel()} "
                                          f"tokens where the reference scored {r.numel()}")
            score_diffs.append(float((theirs_logp - r).abs().max()))
    total = identical + ties + different
    return {"sentences": total, "greedy_identical": identical, "greedy_ties": ties, "greedy_different": different,
            "greedy_agreement": identical / max(total, 1), "examples": examples,
            "max_abs_token_logprob_difference": max(score_diffs, default=0.0),
            "mean_abs_token_logprob_difference": sum(score_diffs) / max(len(score_diffs), 1),
            "scored": "references" if all(t.targets is not None for t in tests) else "greedy outputs"}


def verify(source: ReferenceSource, fp32_dir: Path, tests: Sequence[TestSet], *, tolerance: float,
           quantized_dir: Optional[Path] = None, batch_size: int = 32) -> dict:
    """The float32 model's check (`passed`: no difference beyond ties, scores within tolerance) and, with
    `quantized_dir`, the quantized model's agreement (reported)."""
    runner = ReferenceRunner(source, batch_size=batch_size)
    search = SearchConfig(beam_size=1)
    ours = {t.direction: runner.greedy(t, search) for t in tests}
    fp32 = compare(runner, Ct2Translator(fp32_dir, batch_size=batch_size, compute_type="float32"), tests,
                   tolerance=tolerance, ours=ours)
    fp32["passed"] = fp32["greedy_different"] == 0 and fp32["max_abs_token_logprob_difference"] <= tolerance
    fp32["tolerance"] = tolerance
    result = {"float32": fp32}
    if quantized_dir is not None:
        result["quantized"] = compare(runner, Ct2Translator(quantized_dir, batch_size=batch_size), tests,
                                      tolerance=tolerance, ours=ours)
    return result


__all__ = ["banned_ids", "Ct2Translator", "TestSet", "synthetic_test_sets", "bitext_test_sets", "ReferenceRunner",
           "compare", "verify"]
