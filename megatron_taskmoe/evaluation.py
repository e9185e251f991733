"""Translation quality per task with sacrebleu, and result tables in the shape of Pham et al.'s Table 2.

A table has one row per system and one column per direction, with averages over xx-en (into English, "XE") and
en-xx (out of English, "EX") directions, and over high/low-resource directions when sizes are given. It renders as
markdown, CSV or JSON.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import sacrebleu


@dataclass(kw_only=True)
class TaskScore:
    """Corpus-level scores of one direction."""

    bleu: float
    chrf: float
    sentences: int
    signature: str = ""


def score_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> TaskScore:
    """sacrebleu corpus BLEU (13a tokenization) and chrF on detokenized text."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return TaskScore(bleu=float(b.score), chrf=float(c.score), sentences=len(hypotheses),
                     signature=str(bleu.get_signature()))


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
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    sizes: Mapping[str, int] = field(default_factory=dict)
    high_resource_min: Optional[int] = None
    """Directions with at least this many training sentences count as high-resource."""

    def add(self, system: str, scores: Mapping[str, TaskScore | float]) -> None:
        self.rows[system] = {d: float(getattr(s, self.metric, s)) for d, s in scores.items()}

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
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["system", *self.columns()], lineterminator="\n")
        writer.writeheader()
        for rec in self.records():
            writer.writerow(rec)
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "rows": self.records()}, indent=2)

    def render(self, fmt: str) -> str:
        renderers = {"markdown": self.to_markdown, "csv": self.to_csv, "json": self.to_json}
        if fmt not in renderers:
            raise ValueError(f"unknown table format {fmt!r}; choose from {sorted(renderers)}")
        return renderers[fmt]()


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
