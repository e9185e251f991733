"""Synthetic multilingual bitext whose translations are known exactly: a trainer that works must learn it.

Three made-up languages share one grammar: a sentence is a sequence of words drawn from a language's own
vocabulary (invented word forms, the same number of words in every language), and word i of one language translates
to word i of the others. Two bitexts, written as `{split}.en-de.{en,de}` and `{split}.en-fr.{en,fr}` files (the
layout `tools/train_tokenizer.py` and `tools/preprocess_data.py` read), give four directions of different
difficulty once preprocessed (both directions of each file):

  en -> de, de -> en   word for word through the dictionary
  en -> fr, fr -> en   word for word, and the word order reversed

The language codes are real ISO 639-1 codes so that the tools accept them; the languages are not. Everything is
determined by the seed: the same call writes the same bytes.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

from megatron_taskmoe.fileio import write_text_atomic

LANGUAGES = ("en", "de", "fr")
REVERSED = frozenset({"fr"})
"""Languages whose sentences are written in the reverse word order of English's."""


@dataclass(kw_only=True)
class SyntheticCorpus:
    """Sizes of the corpus written by `write_corpus`."""

    words: int = 40
    """Words per language (the dictionary's size)."""
    min_len: int = 3
    """Fewest words in a sentence."""
    max_len: int = 10
    """Most words in a sentence."""
    train: int = 4000
    """Training pairs per bitext."""
    valid: int = 64
    """Validation pairs per bitext."""
    test: int = 64
    """Test pairs per bitext (sentences never seen in training)."""
    seed: int = 1
    """Seed of the lexicon and the sentences: the same seed writes the same bytes."""

    def __post_init__(self) -> None:
        if self.words < 2 or not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"SyntheticCorpus: need words >= 2 and 1 <= min_len <= max_len, got words={self.words}, "
                             f"min_len={self.min_len}, max_len={self.max_len}")
        for name in ("train", "valid", "test"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticCorpus.{name}={getattr(self, name)} must be >= 1")


def lexicon(words: int, seed: int) -> dict[str, list[str]]:
    """Per language, `words` distinct invented word forms; entry i of every list means the same."""
    rng = random.Random(f"lexicon-{seed}")
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for lang in LANGUAGES:
        # Each language spells with its own part of the alphabet, so word forms never coincide across languages.
        letters = rng.sample(string.ascii_lowercase, 10)
        forms: list[str] = []
        while len(forms) < words:
            form = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
            if form not in seen:
                seen.add(form)
                forms.append(form)
        out[lang] = forms
    return out


def translate(indices: list[int], lang: str, lex: dict[str, list[str]]) -> str:
    """The sentence of word indices `indices` (English order) in `lang`."""
    words = [lex[lang][i] for i in indices]
    return " ".join(reversed(words) if lang in REVERSED else words)


def write_corpus(out_dir: str | Path, corpus: SyntheticCorpus | None = None) -> dict[str, int]:
    """Write the train/valid/test bitexts into `out_dir`; returns the number of pairs per split. Sentences of the
    three splits are disjoint (a test sentence was never trained on)."""
    corpus = corpus or SyntheticCorpus()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lex = lexicon(corpus.words, corpus.seed)
    rng = random.Random(f"sentences-{corpus.seed}")
    seen: set[tuple[int, ...]] = set()
    counts = {}
    for split in ("train", "valid", "test"):
        for other in ("de", "fr"):
            rows: list[list[int]] = []
            while len(rows) < getattr(corpus, split):
                indices = tuple(rng.randrange(corpus.words) for _ in range(rng.randint(corpus.min_len, corpus.max_len)))
                if indices in seen:
                    continue
                seen.add(indices)
                rows.append(list(indices))
            for lang in ("en", other):
                text = "".join(translate(r, lang, lex) + "\n" for r in rows)
                write_text_atomic(out / f"{split}.en-{other}.{lang}", text)
        counts[split] = getattr(corpus, split)
    return counts
