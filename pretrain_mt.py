"""Train a multitask multilingual translation model with task-based MoE on megatron-core.

    torchrun --nproc-per-node P pretrain_mt.py --config examples/configs/FILE.yaml [--set key=value ...]

Works with NCCL on GPUs and gloo on CPUs, one node or many (`torchrun --nnodes N --node-rank R --master-addr A`).
The run directory (`train.run_dir`) receives the resolved config, metrics.jsonl, TensorBoard logs and checkpoints;
a rerun with the same run directory resumes from its latest checkpoint. See README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

# Imports of torch, megatron-core and this package sit inside the functions: `--help` and option errors answer
# before their (slow) import.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run configuration (see examples/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_taskmoe.training.run import run

    return run(args.config, args.overrides)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
