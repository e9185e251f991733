"""Translation quality per task with sacrebleu, and result tables in the shape of Pham et al.'s Table 2.

BLEU is sacrebleu's with the tokenizer the target language needs (`bleu_tokenizer`: 13a, `zh` for Chinese,
`ja-mecab` / `ko-mecab` for Japanese / Korean when their extra dependencies are installed, else `char`; any
sacrebleu tokenizer such as `flores200` by choice); chrF is sacrebleu's default. Every score keeps its sacrebleu
signature, and every rendered table lists the signatures it was computed with.

A table has one row per system and one column per direction, with averages over xx-en (into English, "XE") and
en-xx (out of English, "EX") directions, and over high/low-resource directions when sizes are given. It renders as
markdown, CSV or JSON.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import sacrebleu

# Target languages whose text needs its own BLEU tokenizer (sacrebleu's recommendation), and the fallback when the
# tokenizer's extra dependencies are missing.
LANGUAGE_TOKENIZERS = {"zh": ("zh", "zh"), "ja": ("ja-mecab", "char"), "ko": ("ko-mecab", "char")}
DEFAULT_TOKENIZER = "13a"


@functools.lru_cache(maxsize=None)
def _available(tokenize: str) -> bool:
    try:
        sacrebleu.metrics.BLEU(tokenize=tokenize).corpus_score(["a"], [["a"]])
    except (ImportError, RuntimeError):
        return False
    return True


def bleu_tokenizer(tgt_lang: Optional[str] = None, override: Optional[str] = None) -> str:
    """sacrebleu's BLEU tokenizer for text in `tgt_lang`; `override` (any sacrebleu tokenizer) wins."""
    if override:
        return override
    best, fallback = LANGUAGE_TOKENIZERS.get(tgt_lang or "", (DEFAULT_TOKENIZER, DEFAULT_TOKENIZER))
    return best if best == fallback or _available(best) else fallback


@dataclass(kw_only=True)
class TaskScore:
    """Corpus-level scores of one direction."""

    bleu: float
    """Corpus BLEU (sacrebleu, 0-100)."""
    chrf: float
    """Corpus chrF (sacrebleu, 0-100)."""
    sentences: int
    """Number of scored sentences."""
    signature: str = ""
    """sacrebleu's BLEU signature (tokenizer, version, ...)."""
    chrf_signature: str = ""
    """sacrebleu's chrF signature."""


def score_corpus(hypotheses: Sequence[str], references: Sequence[str], *, tgt_lang: Optional[str] = None,
                 tokenize: Optional[str] = None) -> TaskScore:
    """sacrebleu corpus BLEU (the tokenizer of `bleu_tokenizer(tgt_lang, tokenize)`) and chrF on detokenized
    text."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = sacrebleu.metrics.BLEU(tokenize=bleu_tokenizer(tgt_lang, tokenize))
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return TaskScore(bleu=float(b.score), chrf=float(c.score), sentences=len(hypotheses),
                     signature=str(bleu.get_signature()), chrf_signature=str(chrf.get_signature()))


def direction_group(direction: str, pivot: str = "en") -> Optional[str]:
    """'xx-en' for directions into the pivot, 'en-xx' for out of it, None otherwise."""
    src, tgt = direction.split("-", 1)
    if tgt == pivot:
        return "xx-en"
    if src == pivot:
        return "en-xx"
    return None


@dataclass(kw_only=True)
class ResultTable:
    """Rows: systems; columns: directions. `sizes` (training sentences per direction) enables high/low averages."""

    metric: str = "bleu"
    """Name of the metric in the cells (e.g. "bleu")."""
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    """System -> direction -> score."""
    signatures: dict[str, set[str]] = field(default_factory=dict)
    """sacrebleu signature -> the directions scored with it (filled by `add` from TaskScores)."""
    sizes: Mapping[str, int] = field(default_factory=dict)
    """Direction -> training sentences; directions missing here are left out of the high/low averages."""
    high_resource_min: Optional[int] = None
    """Directions with at least this many training sentences count as high-resource."""

    def add(self, system: str, scores: Mapping[str, TaskScore | float]) -> None:
        self.rows[system] = {d: float(getattr(s, self.metric, s)) for d, s in scores.items()}
        for d, s in scores.items():
            signature = getattr(s, "signature" if self.metric == "bleu" else "chrf_signature", "")
            if signature:
                self.signatures.setdefault(signature, set()).add(d)

    def signature_lines(self) -> list[str]:
        """One line per sacrebleu signature, with its directions when the table mixes several."""
        if len(self.signatures) == 1:
            return [f"sacrebleu {self.metric}: {next(iter(self.signatures))}"]
        return [f"sacrebleu {self.metric}: {sig} ({', '.join(sorted(dirs))})"
                for sig, dirs in sorted(self.signatures.items())]

    def directions(self) -> list[str]:
        seen: list[str] = []
        for row in self.rows.values():
            seen.extend(d for d in row if d not in seen)
        group_order = {"xx-en": 0, "en-xx": 1, None: 2}  # the paper's XE block first, then EX
        return sorted(seen, key=lambda d: (group_order[direction_group(d)], d))

    def averages(self, row: Mapping[str, float]) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for d, v in row.items():
            groups.setdefault("avg", []).append(v)
            g = direction_group(d)
            if g:
                groups.setdefault(f"avg {g}", []).append(v)
            if self.high_resource_min is not None and d in self.sizes:
                key = "avg high" if self.sizes[d] >= self.high_resource_min else "avg low"
                groups.setdefault(key, []).append(v)
        order = ["avg xx-en", "avg en-xx", "avg high", "avg low", "avg"]
        return {k: sum(groups[k]) / len(groups[k]) for k in order if k in groups}

    def columns(self) -> list[str]:
        avg_cols: list[str] = []
        for row in self.rows.values():
            avg_cols.extend(k for k in self.averages(row) if k not in avg_cols)
        return self.directions() + avg_cols

    def records(self) -> list[dict[str, object]]:
        out = []
        for system, row in self.rows.items():
            full = {**row, **self.averages(row)}
            out.append({"system": system, **{c: full.get(c) for c in self.columns()}})
        return out

    def to_markdown(self, digits: int = 1) -> str:
        cols = self.columns()
        lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for rec in self.records():
            cells = ["" if rec[c] is None else f"{rec[c]:.{digits}f}" for c in cols]
            lines.append(f"| {rec['system']} | " + " | ".join(cells) + " |")
        if self.signatures:
            lines += [""] + self.signature_lines()
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["system", *self.columns()], lineterminator="\n")
        writer.writeheader()
        for rec in self.records():
            writer.writerow(rec)
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "rows": self.records(),
                           "signatures": {sig: sorted(dirs) for sig, dirs in self.signatures.items()}}, indent=2)

    def render(self, fmt: str) -> str:
        renderers = {"markdown": self.to_markdown, "csv": self.to_csv, "json": self.to_json}
        if fmt not in renderers:
            raise ValueError(f"unknown table format {fmt!r}; choose from {sorted(renderers)}")
        return renderers[fmt]()


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
