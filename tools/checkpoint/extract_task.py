#!/usr/bin/env python
"""Extract the sub-network of one or several tasks from a task-routed MoE checkpoint (Kudugunta et al. 2021).

In layers routed by task (or target language) every token of a task uses the same top-k experts, so serving that
task needs only those experts: the output keeps them (token-routed layers keep all theirs), the kept tasks' rows
of the task tables and static adapters, and a task map of the kept directions only, so tools/translate.py and
inference.load_checkpoint serve exactly those directions with the full model's outputs.

    # Kudugunta et al.'s best system (token-routed encoder, decoder routed by target language): serve X -> de
    python tools/checkpoint/extract_task.py RUN/checkpoints RUN_de --target-lang de --verify
    python tools/translate.py --checkpoint RUN_de --source-lang en --target-lang de < input.en
    # one or several tasks (a task name or a direction), to one safetensors file
    python tools/checkpoint/extract_task.py RUN/checkpoints de_en.safetensors --task de-en --task fr-en

Prints the parameter counts as Kudugunta et al.'s Table 1 (training; serving all tasks: parameters active per
token; serving the kept tasks: the extracted model) and writes them, with the experts kept per layer, to
OUTPUT.extract.json beside the output (and into the output's checkpoint.json under "extracted"). `--verify`
compares the logits of both models on a fixed batch of the kept directions (exit 1 beyond --tolerance).
Output is written to a temporary sibling and renamed when complete; on bad input (unknown task, existing output,
a model without task-routed layers) it exits 2 with a message naming the option and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

# This package's imports sit inside the functions, where they are used: they import megatron-core, which is
# slow, so the options are checked first.

log = logging.getLogger("extract_task")


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_taskmoe.checkpoint_tools.cli import add_layout_args, add_run_config_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a trainer checkpoint (directory, checkpoints root or run directory) or a "
                   ".safetensors file written by convert.py")
    p.add_argument("output", help="output: a directory (trainer format) or a file ending in .safetensors")
    p.add_argument("--task", action="append", default=[], metavar="NAME",
                   help="keep this task (a task name or a direction such as de-en); repeatable")
    p.add_argument("--target-lang", action="append", default=[], metavar="LANG",
                   help="keep every direction into LANG; repeatable (with --task: both filters apply)")
    p.add_argument("--verify", action="store_true", help="compare the logits of the output and the source on the "
                   "kept directions")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest logit difference --verify accepts")
    add_layout_args(p)
    add_run_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def report_path(output: Path) -> Path:
    return output.parent / f"{output.name}.extract.json"


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
    from megatron_taskmoe.checkpoint_tools.layouts import check_layout
    from megatron_taskmoe.checkpoint_tools.outputs import check_output
    from megatron_taskmoe.checkpoint_tools.reading import read_checkpoint
    from megatron_taskmoe.checkpoint_tools.single_file import SINGLE_FILE_SUFFIX, write_single_file
    from megatron_taskmoe.checkpoint_tools.trainer_checkpoints import write_trainer_checkpoint
    from megatron_taskmoe.checkpoint_tools.cli import layout_from_args, run_config_from_args
    from megatron_taskmoe.checkpoint_tools.extract import extract, max_logit_difference, table

    output = Path(args.output)
    single = output.suffix == SINGLE_FILE_SUFFIX
    if single and (args.tensor, args.expert, args.pipeline, args.expert_tensor) != (1, 1, 1, None):
        raise CheckpointToolError("--tensor/--expert/--pipeline apply to trainer-format outputs; a single file "
                                  "has no layout")
    if not args.task and not args.target_lang:
        raise CheckpointToolError("name what to keep with --task (a task or direction) or --target-lang")
    if not args.tolerance >= 0:
        raise CheckpointToolError(f"--tolerance {args.tolerance} must be >= 0")
    check_output(output, args.overwrite)
    check_output(report_path(output), args.overwrite)
    parallel = layout_from_args(args)
    run_config = run_config_from_args(args)
    source = read_checkpoint(args.source)
    sub, report = extract(source, tasks=args.task, target_langs=args.target_lang)
    if not single:
        check_layout(sub.model_config(), parallel, where=str(output))
    if args.verify:
        diff = max_logit_difference(source, sub)
        report["verify"] = {"max_abs_logit_difference": diff, "tolerance": args.tolerance}
        log.info("largest logit difference on the kept directions: %.3g", diff)
        if not diff <= args.tolerance:
            print(json.dumps(report["verify"]))
            print(f"extract_task.py: error: logits differ by {diff:.3g} (> --tolerance {args.tolerance}); "
                  "nothing written", file=sys.stderr)
            return 1
    if single:
        write_single_file(sub, output, overwrite=args.overwrite)
    else:
        write_trainer_checkpoint(sub, output, parallel, run_config=run_config, overwrite=args.overwrite)
    report["output"] = str(output)
    write_json_atomic(report_path(output), report)
    print(table(report))
    print(json.dumps({"output": str(output), "report": str(report_path(output)),
                      "parameters": report["parameters"], **({"verify": report["verify"]} if args.verify else {})}))
    return 0


if __name__ == "__main__":
    from megatron_taskmoe.checkpoint_tools.cli import run

    sys.exit(run(main, "extract_task.py"))
