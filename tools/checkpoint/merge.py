#!/usr/bin/env python
"""Merge two task-MoE checkpoints trained on disjoint task sets into one (Pham et al. 2023, section 5.2.2).

Dynamic adapters are kept and combined (2 + 2 become 4), task embeddings and task routers are expanded so routing
chooses among all adapters, every other transformer and MoE weight is averaged, and the task map covers both task
sets. Both models must share the architecture and the tokenizer.

    python tools/checkpoint/merge.py RUN_A/checkpoints RUN_B/checkpoints MERGED \\
        --data-dir data-bin-union --config examples/configs/tiny_cpu.yaml --set train.steps=300
    # continue training on the union of tasks (the merge prints the --set flags the model needs):
    python pretrain_mt.py --config examples/configs/tiny_cpu.yaml --set data.data_dir=data-bin-union \\
        --set checkpoint.load=MERGED --set model.overrides.moe.adapters.num_adapters=4 --set train.steps=300

`--data-dir` (a tools/preprocess_data.py output holding both task sets) makes the merged task ids and language
ids exactly those of that corpus, so pretrain_mt.py accepts the checkpoint on it; without it, A's tasks come first.
The output is a trainer checkpoint (fresh optimizer, LR schedule from --config, step 0) or, for a name ending in
.safetensors, one file. Written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# This package's imports sit inside the functions, where they are used: they import megatron-core, which is
# slow, so the options are checked first.

log = logging.getLogger("merge")


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_taskmoe.checkpoint_tools.cli import add_layout_args, add_run_config_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_a", help="first checkpoint (trainer directory or .safetensors)")
    p.add_argument("checkpoint_b", help="second checkpoint, trained on other tasks")
    p.add_argument("output", help="output directory (trainer format) or a .safetensors file")
    p.add_argument("--data-dir", default=None, help="preprocessed union corpus: take its task map and languages")
    p.add_argument("--weight", type=float, default=0.5, help="averaging weight of A (B gets 1 - weight)")
    add_layout_args(p)
    add_run_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
    from megatron_taskmoe.checkpoint_tools.outputs import check_output
    from megatron_taskmoe.checkpoint_tools.reading import read_checkpoint
    from megatron_taskmoe.checkpoint_tools.single_file import SINGLE_FILE_SUFFIX, write_single_file
    from megatron_taskmoe.checkpoint_tools.trainer_checkpoints import write_trainer_checkpoint
    from megatron_taskmoe.checkpoint_tools.cli import layout_from_args, run_config_from_args
    from megatron_taskmoe.checkpoint_tools.merge import config_overrides, merge

    output = Path(args.output)
    check_output(output, args.overwrite)
    parallel = layout_from_args(args)
    run_config = run_config_from_args(args)
    task_map = languages = None
    if args.data_dir is not None:
        from megatron_taskmoe.data.bitext import DataError
        from megatron_taskmoe.data.manifest import load_manifest

        try:
            manifest = load_manifest(Path(args.data_dir))
        except DataError as e:
            raise CheckpointToolError(f"--data-dir: {e}") from None
        task_map, languages = manifest["task_map"], manifest["languages"]
    a, b = read_checkpoint(args.checkpoint_a), read_checkpoint(args.checkpoint_b)
    merged = merge(a, b, weight=args.weight, task_map=task_map, languages=languages)
    if output.suffix == SINGLE_FILE_SUFFIX:
        write_single_file(merged, output, overwrite=args.overwrite)
    else:
        write_trainer_checkpoint(merged, output, parallel, run_config=run_config, overwrite=args.overwrite)
    flags = config_overrides(merged.model_config())
    print(json.dumps({"output": str(output), "tasks": merged.meta["task_map"]["tasks"],
                      "languages": merged.meta["languages"], "parameters": merged.num_parameters(),
                      "pretrain_mt_overrides": flags}, indent=2))
    if flags:
        log.info("continue training with: pretrain_mt.py ... --set checkpoint.load=%s %s", output,
                 " ".join(f"--set {f}" for f in flags))
    return 0


if __name__ == "__main__":
    from megatron_taskmoe.checkpoint_tools.cli import run

    sys.exit(run(main, "merge.py"))
