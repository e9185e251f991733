#!/usr/bin/env python
"""The ceiling for benchmarks/preprocess.py: sentencepiece's own encoding of every line of the bitext files, as a
whole process that does nothing else (no checks, no filters, no output).

  --mode threads     one process: each file is read and encoded with `sp.encode(lines, num_threads=W)`
  --mode processes   all files are read, then W forked processes encode a contiguous 1/W of the lines each, with
                     `sp.encode(batch, num_threads=1)` on batches of 65536 lines

Prints the number of sentences and pieces encoded, so that the peers can be checked to have done the same work.

  python benchmarks/sentencepiece_ceiling.py --input-dir demo_output/bible --tokenizer demo_output/spm.model
"""

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

import sentencepiece as spm

_LINES: list[str] = []  # the lines to encode, inherited by the forked processes
_SP: list = []
BATCH = 65536


def bitext_files(input_dir: Path) -> list[Path]:
    """Every aligned bitext side `{split}.{src}-{tgt}.{lang}` in the directory, sorted."""
    return sorted(p for p in input_dir.iterdir() if p.is_file() and len(p.name.split(".")) == 3
                  and "-" in p.name.split(".")[1] and p.name.split(".")[2] in p.name.split(".")[1].split("-"))


def read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _encode_range(bounds: tuple[int, int]) -> int:
    start, stop = bounds
    batches = (_LINES[i: min(i + BATCH, stop)] for i in range(start, stop, BATCH))
    return sum(sum(map(len, _SP[0].encode(batch, num_threads=1))) for batch in batches)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-dir", required=True, type=Path)
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--mode", choices=["threads", "processes"], default="threads")
    args = p.parse_args(argv)
    _SP.append(spm.SentencePieceProcessor(model_file=str(args.tokenizer)))
    sentences = pieces = 0
    for path in bitext_files(args.input_dir):
        lines = read_lines(path)
        sentences += len(lines)
        if args.mode == "threads":
            pieces += sum(map(len, _SP[0].encode(lines, num_threads=args.workers)))
        else:
            _LINES.extend(lines)
    if args.mode == "processes":
        cuts = [len(_LINES) * k // args.workers for k in range(args.workers + 1)]
        with mp.get_context("fork").Pool(args.workers) as pool:
            pieces = sum(pool.map(_encode_range, list(zip(cuts[:-1], cuts[1:]))))
    print(f"{sentences} sentences, {pieces} pieces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
