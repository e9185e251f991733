#!/usr/bin/env python
"""Reshard a pretrain_mt.py checkpoint offline to another TP/EP layout, or to/from one parallelism-free file.

    # trainer checkpoint (any layout) -> tensor-parallel 2 (model, optimizer, LR schedule and counters kept)
    python tools/checkpoint/convert.py RUN/checkpoints/step_00001000 OUT_TP2 --tensor 2
    # -> expert-parallel 4
    python tools/checkpoint/convert.py RUN/checkpoints/step_00001000 OUT_EP4 --expert 4
    # -> one safetensors file (full tensors, the checkpoint record and the tokenizer inside)
    python tools/checkpoint/convert.py RUN/checkpoints/step_00001000 model.safetensors
    # single file -> trainer checkpoint at a layout (fresh optimizer; --config describes the run to continue)
    python tools/checkpoint/convert.py model.safetensors OUT --expert 2 --config examples/configs/tiny_cpu.yaml

A trainer-format output resumes with `pretrain_mt.py --set checkpoint.load=OUT` under the new layout. `--verify`
reads the output back and prints the largest logit difference to the source on a fixed batch (0 up to fp32
rounding). Output is written to a temporary sibling and renamed when complete; on any error nothing is left.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# This package's imports sit inside the functions, where they are used: they import megatron-core, which is
# slow, so the options are checked first.

log = logging.getLogger("convert")


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_taskmoe.checkpoint_tools.cli import add_layout_args, add_run_config_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a trainer checkpoint directory (or its run/checkpoints root) or a .safetensors "
                   "file written by this tool")
    p.add_argument("output", help="output: a directory (trainer format) or a file ending in .safetensors")
    p.add_argument("--single-file", action="store_true", help="write one .safetensors file (implied by the suffix)")
    add_layout_args(p)
    add_run_config_args(p)
    p.add_argument("--verify", action="store_true", help="read the output back and compare logits to the source")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
    from megatron_taskmoe.checkpoint_tools.outputs import check_output
    from megatron_taskmoe.checkpoint_tools.reading import read_checkpoint
    from megatron_taskmoe.checkpoint_tools.single_file import SINGLE_FILE_SUFFIX, read_single_file, write_single_file
    from megatron_taskmoe.checkpoint_tools.trainer_checkpoints import (convert_trainer_checkpoint,
                                                                       write_trainer_checkpoint)
    from megatron_taskmoe.checkpoint_tools.cli import layout_from_args, run_config_from_args

    source, output = Path(args.source), Path(args.output)
    single = args.single_file or output.suffix == SINGLE_FILE_SUFFIX
    if single and output.suffix != SINGLE_FILE_SUFFIX:
        raise CheckpointToolError(f"{output}: a single-file output must end in {SINGLE_FILE_SUFFIX}")
    if single and (args.tensor, args.expert, args.pipeline, args.expert_tensor) != (1, 1, 1, None):
        raise CheckpointToolError("--tensor/--expert/--pipeline apply to trainer-format outputs; a single file "
                                  "has no layout")
    parallel = layout_from_args(args)
    check_output(output, args.overwrite)
    if single:
        ckpt = read_checkpoint(source)
        write_single_file(ckpt, output, overwrite=args.overwrite)
    elif source.is_file():
        ckpt = read_single_file(source)
        write_trainer_checkpoint(ckpt, output, parallel, run_config=run_config_from_args(args),
                                 overwrite=args.overwrite, extra_meta={"converted_from": {"path": str(source)}})
    else:
        convert_trainer_checkpoint(source, output, parallel, overwrite=args.overwrite)
    log.info("wrote %s", output)
    if args.verify:
        from megatron_taskmoe.checkpoint_tools.verify import max_logit_difference

        before, after = read_checkpoint(source), read_checkpoint(output)
        diff = max_logit_difference(before, after)
        print(json.dumps({"output": str(output), "max_abs_logit_difference": diff}))
        if not diff <= 1e-5:
            print(f"convert.py: error: logits differ by {diff:.3g} (> 1e-5)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    from megatron_taskmoe.checkpoint_tools.cli import run

    sys.exit(run(main, "convert.py"))
