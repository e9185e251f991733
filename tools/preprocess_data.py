#!/usr/bin/env python
"""Turn bitext into megatron-core indexed datasets (one per direction and side) plus OUT/manifest.json.

Inputs (in --input-dir): aligned files {split}.{src}-{tgt}.{src} + {split}.{src}-{tgt}.{tgt}, TSV files
{split}.{src}-{tgt}.tsv (source<TAB>target) or JSONL files {split}.{src}-{tgt}.jsonl ({"src": ..., "tgt": ...}).
Each bitext is tokenized once and gives both directions (xx-en and en-xx) unless --one-direction is set.
Filters (each counted in the summary and the manifest): empty side (no pieces), too long (--max-len pieces), length
ratio (--max-ratio). A bitext whose pairs the filters remove entirely is an error (nothing is written), one that loses
more than --warn-removed of them gets a warning; without --splits a `train` split is required.

  python tools/preprocess_data.py --input-dir data/bible --tokenizer data/spm.model --output-dir data/bin --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_taskmoe.data.bitext import DataError
from megatron_taskmoe.data.manifest import TASK_MAP_MODES
from megatron_taskmoe.data.preprocess import FILTERS, PreprocessConfig, removal_warnings, run_preprocess


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input-dir", required=True, type=Path)
    p.add_argument("--tokenizer", required=True, type=Path, help="sentencepiece model from tools/train_tokenizer.py")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding threads")
    p.add_argument("--max-len", type=int, default=256, help="drop pairs with a side longer than this (pieces); 0: off")
    p.add_argument("--max-ratio", type=float, default=3.0,
                   help="drop pairs whose longer side has more than this times the pieces of the shorter; 0: off")
    p.add_argument("--warn-removed", type=float, default=0.1,
                   help="warn about a bitext that loses more than this share of its pairs to the filters")
    p.add_argument("--splits", nargs="+", default=None,
                   help="only these splits (default: all found, and a train split must be among them)")
    p.add_argument("--one-direction", action="store_true", help="only the direction named in the file names")
    p.add_argument("--task-map", default="direction",
                   help=f"task ids: one of {', '.join(TASK_MAP_MODES)}, or a JSON/YAML groups file")
    p.add_argument("--extra-language-codes", nargs="*", default=[], help="accept these non-ISO-639-1 codes")
    p.add_argument("--chunk-pairs", type=int, default=4096, help="pairs per encoding work item")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = PreprocessConfig(
            input_dir=args.input_dir, tokenizer=args.tokenizer, output_dir=args.output_dir, workers=args.workers,
            max_len=args.max_len, max_ratio=args.max_ratio, splits=tuple(args.splits) if args.splits else None,
            both_directions=not args.one_direction, task_map=args.task_map, chunk_pairs=args.chunk_pairs,
            warn_removed=args.warn_removed,
            extra_language_codes=tuple(args.extra_language_codes), progress=not args.no_progress)
        manifest = run_preprocess(cfg)
    except DataError as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{'input':24} {'lines':>9} {'kept':>9} " + " ".join(f"{f:>9}" for f in FILTERS))
    for name, info in manifest["inputs"].items():
        removed = manifest["filters"]["removed"][name]
        print(f"{name:24} {info['lines']:9d} {info['kept']:9d} " + " ".join(f"{removed[f]:9d}" for f in FILTERS))
    print(f"{'direction':10} {'task':>4} " + " ".join(f"{s + ' sents':>12} {s + ' src tok':>13}" for s in
                                                   sorted({s for d in manifest['directions'].values()
                                                           for s in d['splits']})))
    splits = sorted({s for d in manifest["directions"].values() for s in d["splits"]})
    for name, d in manifest["directions"].items():
        cells = []
        for s in splits:
            info = d["splits"].get(s, {"sentences": 0, "src_tokens": 0})
            cells.append(f"{info['sentences']:12d} {info['src_tokens']:13d}")
        print(f"{name:10} {d['task_id']:4d} " + " ".join(cells))
    for warning in removal_warnings(manifest, args.warn_removed):
        print(f"preprocess_data.py: warning: {warning}", file=sys.stderr)
    total = sum(info["lines"] for info in manifest["inputs"].values())
    print(f"wrote {len(manifest['directions'])} directions, {len(manifest['task_map']['tasks'])} tasks "
          f"({manifest['task_map']['mode']}), dtype {manifest['dtype']}, to {args.output_dir}/manifest.json: "
          f"{total} pairs in {manifest['seconds']:.1f}s ({total / max(manifest['seconds'], 1e-9):,.0f} pairs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
