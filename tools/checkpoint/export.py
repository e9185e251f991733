#!/usr/bin/env python
"""Export a checkpoint as a standalone inference directory: model.safetensors + config.json + tokenizer.model.

    python tools/checkpoint/export.py RUN/checkpoints EXPORT_DIR --verify
    python tools/checkpoint/export.py model.safetensors EXPORT_BF16 --dtype bf16

The directory loads with the pure-PyTorch reference model, without megatron-core or a process group:

    from megatron_taskmoe.reference import load, ReferenceTranslator
    ReferenceTranslator(load("EXPORT_DIR"), beam_size=4).translate(["Hello"], "en", "de")

SOURCE is a trainer checkpoint of any parallel layout (a step directory, its checkpoints root or the run
directory) or a .safetensors file written by convert.py. `--verify` runs the checkpoint's megatron model and the
exported reference model on a fixed batch (ragged padding, every task) and prints the largest logit difference and
whether greedy and beam-4 outputs agree; above `--tolerance` or on any disagreement it exits 1 and writes nothing.
The output is written to a `.partial.` sibling and renamed when complete; bad input exits 2 naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys

# This package's imports sit inside the functions, where they are used: they import megatron-core, which is
# slow, so the options are checked first.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="trainer checkpoint (step dir, checkpoints root or run dir) or a .safetensors "
                   "file written by convert.py")
    p.add_argument("output", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="stored weight precision")
    p.add_argument("--verify", action="store_true", help="check the export reproduces the checkpoint's logits "
                   "and greedy/beam outputs before it appears")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest acceptable logit difference for --verify "
                   "(fp32 exports of the test models differ by about 1e-6)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_taskmoe.checkpoint_tools.export import ExportVerificationError, export

    try:
        summary = export(args.source, args.output, dtype=args.dtype, overwrite=args.overwrite, verify=args.verify,
                         tolerance=args.tolerance)
    except ExportVerificationError as e:
        print(f"export.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from megatron_taskmoe.checkpoint_tools.cli import run

    sys.exit(run(main, "export.py"))
