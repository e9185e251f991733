"""Parallel layouts of trainer checkpoints the tools write: parsing, the process count, compatibility checks.

Legend: TP tensor-, EP expert-, PP pipeline-parallel sizes.
"""

from __future__ import annotations

from typing import Optional

from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
from megatron_taskmoe.config_io import to_dict
from megatron_taskmoe.model.config import ModelConfig, ParallelConfig


def parse_layout(tensor: int = 1, expert: int = 1, pipeline: int = 1, expert_tensor: Optional[int] = None
                 ) -> ParallelConfig:
    if pipeline != 1:
        raise CheckpointToolError(f"--pipeline {pipeline}: pretrain_mt.py does not train with pipeline parallelism "
                                  "yet, so checkpoints are written with pipeline=1")
    try:
        return ParallelConfig(tensor=tensor, pipeline=pipeline, expert=expert, expert_tensor=expert_tensor)
    except ValueError as e:
        raise CheckpointToolError(f"parallel layout: {e}") from None


def minimal_world_size(parallel: ParallelConfig) -> int:
    """The fewest processes that hold the layout: TP x PP x DP with EP x ETP dividing DP x TP."""
    etp = parallel.tensor if parallel.expert_tensor is None else parallel.expert_tensor
    for dp in range(1, parallel.expert * etp + 1):
        world = parallel.tensor * parallel.pipeline * dp
        try:
            parallel.validate_world_size(world)
            return world
        except ValueError:
            continue
    raise CheckpointToolError(f"no world size holds the layout {to_dict(parallel)}")


def check_layout(model_cfg: ModelConfig, parallel: ParallelConfig, source_parallel: Optional[dict] = None,
                 where: str = "") -> int:
    """Every divisibility of the target layout, and an embedding padding equal to the source's; the world size."""
    world = minimal_world_size(parallel)
    try:
        parallel.validate(model_cfg, world)
    except ValueError as e:
        raise CheckpointToolError(f"{where}: incompatible sizes for the target layout: {e}") from None
    if source_parallel is not None:
        src_tp = int(source_parallel.get("tensor", 1))
        if model_cfg.padded_vocab_size(src_tp) != model_cfg.padded_vocab_size(parallel.tensor):
            raise CheckpointToolError(
                f"{where}: the embedding has {model_cfg.padded_vocab_size(src_tp)} rows at tensor={src_tp} but "
                f"{model_cfg.padded_vocab_size(parallel.tensor)} at tensor={parallel.tensor} "
                "(vocab_pad_multiple); convert through --single-file first")
    return world
