"""What the tools/checkpoint/*.py scripts share: error handling, exit codes, layout and run-config options.

Exit codes: 0 done; 2 a bad input or option (the message names the file or the option; nothing was written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from megatron_taskmoe import compat

from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError, quiet_megatron
from megatron_taskmoe.checkpoint_tools.layouts import parse_layout
from megatron_taskmoe.config_io import ConfigError

EXIT_BAD_INPUT = 2


def add_layout_args(parser: argparse.ArgumentParser, what: str = "output") -> None:
    group = parser.add_argument_group(f"{what} parallel layout (trainer-format output)")
    group.add_argument("--tensor", type=int, default=1, help="tensor-parallel size")
    group.add_argument("--expert", type=int, default=1, help="expert-parallel size")
    group.add_argument("--expert-tensor", type=int, default=None,
                       help="tensor parallelism inside experts (default: same as --tensor)")
    group.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel size (only 1: the trainer has no "
                       "pipeline support yet)")


def layout_from_args(args):
    return parse_layout(tensor=args.tensor, expert=args.expert, pipeline=args.pipeline,
                        expert_tensor=args.expert_tensor)


def add_run_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "continued training (fresh optimizer and LR schedule written into a trainer-format output)")
    group.add_argument("--config", default=None, help="the pretrain_mt.py YAML of the run that will continue from "
                       "the output: its optim section and train.steps build the LR schedule (default: defaults)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of --config, as pretrain_mt.py --set (repeatable)")


def run_config_from_args(args) -> dict:
    # layout_jobs imports megatron-core and the trainer: imported here, after the tools have checked their options.
    from megatron_taskmoe.checkpoint_tools.layout_jobs import load_run_config

    return load_run_config(args.config, args.overrides)


def run(main: Callable[[], int], prog: str) -> int:
    """Prepare megatron-core (`compat.apply()`) and call `main()`; a CheckpointToolError (or a config error) is
    printed as `prog: error: ...`, exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_megatron()
    compat.apply()
    try:
        return main()
    except (CheckpointToolError, ConfigError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
