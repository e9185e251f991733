"""Names and constants of the trainer checkpoint format (see the package docstring for the layout)."""

from __future__ import annotations

MARKER = "checkpoint.json"
"""The record of a complete checkpoint (`CheckpointRecord`); a directory without it is not a checkpoint."""
TOKENIZER_FILE = "tokenizer.model"
"""The sentencepiece model copied beside `checkpoint.json`."""
LATEST = "latest"
"""A file in the checkpoint root naming the newest complete checkpoint directory."""
PARTIAL_PREFIX = ".partial."
"""Prefix of a directory being written; renamed to its final name when complete."""
RANK_STATE_DIR = "rank_state"
"""Sub-directory of per-rank state that cannot be resharded (RNG states), one file per global rank."""
CHECKPOINTS_DIR = "checkpoints"
"""The checkpoint root inside a run directory."""

MODEL_CKPT_METADATA = {"non_homogeneous_layers": True}
"""megatron-core's sharded-state-dict metadata for the model: keys of the bare model, one entry per layer by its
global number (the layers of a block may differ, e.g. MoE on alternate layers)."""
OPTIMIZER_CKPT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}
"""megatron-core's metadata for the optimizer: state in model space, so a resume may change TP/PP/EP/DP sizes; the
memory-efficient variant gathers it over gloo on the CPU (on GPUs too)."""


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint saved after `step` steps."""
    return f"step_{step:08d}"


def rank_state_name(rank: int) -> str:
    """The file name of a global rank's state under `RANK_STATE_DIR`."""
    return f"rank_{rank:05d}.pt"
