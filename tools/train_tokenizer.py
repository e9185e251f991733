#!/usr/bin/env python
"""Train the joint sentencepiece tokenizer over all languages of a bitext directory.

Training sentences are drawn per language with temperature (p_L ~ n_L^(1/T)) so that low-resource languages get
their share of the vocabulary; each language's tag `<2xx>` is a user-defined symbol, and pad/unk/bos/eos have the
fixed ids 0/1/2/3. Deterministic given the data and --seed. A language without any non-blank sentence is an error
naming its files (nothing is written); a blank side of one bitext, whose language has sentences elsewhere, a warning.

  python tools/train_tokenizer.py --input-dir data/bible --output-prefix data/spm --vocab-size 8000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from megatron_taskmoe.data.bitext import DataError, discover_bitexts, languages_of, read_bitext
from megatron_taskmoe.data.tokenizer import Tokenizer, sample_corpus, temperature_probabilities, train_sentencepiece


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input-dir", required=True, type=Path, help="bitext directory (same formats as preprocessing)")
    p.add_argument("--output-prefix", required=True, type=Path, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--split", default="train", help="which split's sentences to train on")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    p.add_argument("--temperature", type=float, default=5.0, help="language sampling temperature T")
    p.add_argument("--sentences", type=int, default=300_000, help="training sentences drawn over all languages")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--extra-language-codes", nargs="*", default=[], help="accept these non-ISO-639-1 codes")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def read_sentences(bitexts) -> tuple[dict[str, list[str]], list[str]]:
    """Distinct non-blank sentences per language, and warnings about blank bitext sides; a language without any
    sentence is an error naming its files (a tokenizer trained without it could not encode it)."""
    by_lang: dict[str, dict[str, None]] = {lang: {} for lang in languages_of(bitexts)}
    blank: dict[str, list[str]] = {lang: [] for lang in by_lang}  # the sides without a sentence, described
    for b in tqdm(bitexts, desc="reading", unit="file"):
        src, tgt = read_bitext(b)
        for lang, side, path in ((b.src, src, b.paths[0]), (b.tgt, tgt, b.paths[-1])):
            # dict keys: a language shared by several pairs (English) counts each distinct sentence once
            by_lang[lang].update(dict.fromkeys(s for s in side if s.strip()))
            if not any(s.strip() for s in side):
                where = f"{path} ({len(side)} lines, all blank)" if b.kind == "aligned" else \
                    f"the {lang} side of {path} ({len(side)} pairs, all blank)"
                blank[lang].append(where)
    missing = [lang for lang, s in by_lang.items() if not s]
    if missing:
        raise DataError("; ".join(f"language '{lang}' has no sentences to train on: {', '.join(blank[lang])}"
                                  for lang in missing))
    warnings = [f"{where}: no {lang} sentences there (the language has {len(by_lang[lang])} elsewhere)"
                for lang, wheres in blank.items() for where in wheres]
    return {lang: list(s) for lang, s in by_lang.items()}, warnings


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        if args.vocab_size < 16 or args.sentences < 1 or args.temperature <= 0:
            raise DataError("--vocab-size must be >= 16, --sentences >= 1 and --temperature > 0")
        bitexts = discover_bitexts(args.input_dir, splits={args.split}, extra_codes=args.extra_language_codes)
        sentences, warnings = read_sentences(bitexts)
        sample = sample_corpus(sentences, args.sentences, args.temperature, args.seed)
        args.output_prefix.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.output_prefix.parent, prefix=".tmp-spm-") as tmp:
            corpus = Path(tmp) / "corpus.txt"
            with open(corpus, "w", encoding="utf-8") as f:
                for lang in sorted(sample):
                    f.writelines(s.replace("\n", " ") + "\n" for s in sample[lang])
            print(f"training a {args.model_type} model, vocab {args.vocab_size}, on {args.sentences} sentences ...",
                  flush=True)
            train_sentencepiece(corpus_file=corpus, model_prefix=Path(tmp) / "spm", vocab_size=args.vocab_size,
                                model_type=args.model_type, languages=list(sentences),
                                character_coverage=args.character_coverage, seed=args.seed,
                                num_threads=args.threads)
            Tokenizer(Path(tmp) / "spm.model").check_languages(sentences)
            for ext in ("vocab", "model"):  # the model last: it is what the other tools look for
                os.replace(Path(tmp) / f"spm.{ext}", f"{args.output_prefix}.{ext}")
        tok = Tokenizer(f"{args.output_prefix}.model")
    except DataError as e:
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"train_tokenizer.py: warning: {warning}", file=sys.stderr)
    probs = temperature_probabilities([len(sentences[lang]) for lang in sorted(sentences)], args.temperature)
    print(f"{'lang':6} {'sentences':>10} {'drawn':>8} {'share':>7}")
    for lang, p in zip(sorted(sentences), probs):
        print(f"{lang:6} {len(sentences[lang]):10d} {len(sample[lang]):8d} {p:7.3f}")
    print(f"wrote {args.output_prefix}.model (vocab {tok.vocab_size}, {len(sentences)} language tags, "
          f"sha256 {tok.sha256()[:12]}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
