#!/usr/bin/env python
"""Preprocessing throughput on the Bible corpus: ours (1 and 2 workers) vs the raw sentencepiece ceiling and a
Megatron-style pipeline.

  (ceiling)   sentencepiece batch-encoding all lines of all sides in one process, no I/O (`sp.encode(list)`);
  (megatron)  what Megatron-LM's tools/preprocess_data_nmt.py does: multiprocessing Pool.imap over lines (one
              `encode` per line, chunksize 64) + IndexedDatasetBuilder.add_item, run once per side of each bitext
              (one direction; we also write the reverse direction);
  (ours)      megatron_taskmoe.data.preprocess.run_preprocess, both directions, filters on.
megatron.core is imported before timing (a fixed ~2-7 s start-up cost shared by both pipelines). Times are the best
of --repeats runs (this machine's speed varies from run to run); sentences/s count both sides of every pair.

  python benchmarks/preprocess.py --bitext-dir demo_output/bible --tokenizer demo_output/spm.model
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import sentencepiece as spm

from megatron_taskmoe.data.bitext import discover_bitexts, read_bitext
from megatron_taskmoe.data.preprocess import PreprocessConfig, direction_files, run_preprocess

_SP = None


def _init(model):
    global _SP
    _SP = spm.SentencePieceProcessor(model_file=model)


def _encode_line(line):
    return _SP.encode(line)


def megatron_style(bitexts, model, out_dir: Path, workers: int) -> None:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    vocab = spm.SentencePieceProcessor(model_file=model).get_piece_size()
    with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(model,)) as pool:
        for b in bitexts:
            for path, prefix in zip(b.paths, direction_files(b.split, b.src, b.tgt)):
                builder = IndexedDatasetBuilder(str(out_dir / f"{prefix}.bin"), dtype=DType.optimal_dtype(vocab))
                with open(path, encoding="utf-8") as f:
                    for ids in pool.imap(_encode_line, f, 64):
                        builder.add_item(torch.tensor(np.asarray(ids, dtype=np.int64)))
                        builder.end_document()
                builder.finalize(str(out_dir / f"{prefix}.idx"))


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bitext-dir", required=True, type=Path, help="output of examples/bible/prepare_data.py")
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--split", default="train")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (fixed start-up cost, not timed)

    bitexts = discover_bitexts(args.bitext_dir, {args.split})
    lines = [s for b in bitexts for side in read_bitext(b) for s in side]
    n = len(lines)
    print(f"{len(bitexts)} bitexts, {n // 2} pairs, {n} sentences; cores: {os.cpu_count()}")
    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    rows = []
    t = best_of(args.repeats, lambda: sp.encode(lines, num_threads=1))
    rows.append(("ceiling: sp.encode(list), 1 thread", t))
    t = best_of(args.repeats, lambda: sp.encode(lines, num_threads=os.cpu_count()))
    rows.append((f"ceiling: sp.encode(list), {os.cpu_count()} threads", t))
    ceiling = min(r[1] for r in rows)
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        for w in args.workers:
            out = work / f"megatron{w}"
            out.mkdir()
            rows.append((f"megatron-style Pool.imap, {w} workers (one direction)",
                         best_of(args.repeats, lambda: megatron_style(bitexts, str(args.tokenizer), out, w))))
        for w in args.workers:
            cfg = PreprocessConfig(input_dir=args.bitext_dir, tokenizer=args.tokenizer, output_dir=work / f"ours{w}",
                                   workers=w, splits=(args.split,), progress=False)
            rows.append((f"ours, {w} workers (both directions)", best_of(args.repeats, lambda: run_preprocess(cfg))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'pipeline':52} {'seconds':>8} {'sent/s':>10} {'vs ceiling':>10}")
    for name, t in rows:
        print(f"{name:52} {t:8.2f} {n / t:10,.0f} {ceiling / t:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
