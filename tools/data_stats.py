#!/usr/bin/env python
"""Per-direction sizes, temperature-sampling probabilities and expected epochs of a preprocessed data directory.

Expected epochs = samples * p_d / n_d: with T=5 a small direction can repeat many times while a large one is not
even seen once; check this before choosing the number of training steps. The directory is checked first (manifest
fields, every .bin/.idx of the split present and of the recorded size): a broken one is a one-line error.

  python tools/data_stats.py --data-dir data/bin --temperature 5 --samples 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_taskmoe.data.bitext import DataError
from megatron_taskmoe.data.manifest import check_data_files, load_manifest
from megatron_taskmoe.data.tokenizer import temperature_probabilities


def direction_stats(manifest: dict, split: str, temperature: float, samples: int) -> dict:
    names = [d for d, e in sorted(manifest["directions"].items()) if split in e["splits"]]
    if not names:
        raise DataError(f"no direction has a {split!r} split")
    sizes = [manifest["directions"][d]["splits"][split]["sentences"] for d in names]
    if sum(sizes) <= 0 or min(sizes) < 0:
        raise DataError(f"the {split!r} split has no sentences in any direction ({', '.join(names)}): nothing to "
                        "sample from (re-run tools/preprocess_data.py, which refuses such data)")
    probs = temperature_probabilities(sizes, temperature)
    return {d: {"sentences": n, "probability": float(p), "epochs": float(samples * p / n) if n else 0.0}
            for d, n, p in zip(names, sizes, probs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--temperature", type=float, default=5.0)
    p.add_argument("--samples", type=int, default=1_000_000, help="training samples (sentence pairs) planned")
    p.add_argument("--split", default="train")
    p.add_argument("--json", action="store_true", help="print JSON only")
    args = p.parse_args(argv)
    try:
        if args.temperature <= 0 or args.samples < 0:
            raise DataError("--temperature must be > 0 and --samples >= 0")
        manifest = load_manifest(args.data_dir)
        stats = direction_stats(manifest, args.split, args.temperature, args.samples)
        check_data_files(args.data_dir, manifest, args.split)
    except DataError as e:
        print(f"data_stats.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"temperature": args.temperature, "directions": stats}))
        return 0
    tasks = manifest["task_map"]
    print(f"{args.data_dir}: {len(manifest['languages'])} languages ({' '.join(manifest['languages'])}), "
          f"{len(stats)} directions, {len(tasks['tasks'])} tasks ({tasks['mode']}), "
          f"vocab {manifest['tokenizer']['vocab_size']}")
    print(f"{'direction':10} {'task':>4} {'sentences':>10} {'src tok':>10} {'tgt tok':>10} {'p(T=' + str(args.temperature) + ')':>9} "
          f"{'epochs':>8}")
    for d, s in stats.items():
        info = manifest["directions"][d]["splits"][args.split]
        print(f"{d:10} {manifest['directions'][d]['task_id']:4d} {s['sentences']:10d} {info['src_tokens']:10d} "
              f"{info['tgt_tokens']:10d} {s['probability']:9.4f} {s['epochs']:8.2f}")
    empty = [d for d, s in stats.items() if s["sentences"] == 0]
    if empty:
        print(f"data_stats.py: warning: direction(s) {' '.join(empty)} have no {args.split!r} sentences and are never "
              "sampled", file=sys.stderr)
    epochs = [s["epochs"] for s in stats.values() if s["sentences"]]
    print(f"{args.samples} samples at T={args.temperature}: epochs per direction range {min(epochs):.2f} to "
          f"{max(epochs):.2f} (ratio {max(epochs) / max(min(epochs), 1e-12):.1f}x)")
    removed = manifest["filters"]["removed"]
    total = {k: sum(r.get(k, 0) for r in removed.values()) for k in manifest["filters"]["order"]}
    print("filtered pairs: " + ", ".join(f"{k} {v}" for k, v in total.items()) +
          f" (max_len {manifest['filters'].get('max_len')}, max_ratio {manifest['filters'].get('max_ratio')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
