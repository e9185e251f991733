"""Reading any checkpoint into a `FullCheckpoint`: a trainer checkpoint directory of any layout (through the
inference loader: megatron-core's dist_checkpointing reshards whatever layout the run saved into the one-process
model) or a single `.safetensors` file."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_taskmoe.checkpoint.format import MARKER
from megatron_taskmoe.checkpoint.record import read_record
from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError, FullCheckpoint, quiet_megatron
from megatron_taskmoe.checkpoint_tools.single_file import SINGLE_FILE_SUFFIX, read_single_file
from megatron_taskmoe.inference import CheckpointError, load_checkpoint


def read_trainer_checkpoint(path: str | os.PathLike) -> FullCheckpoint:
    """A trainer checkpoint directory (or root / run directory) of any layout, through the inference loader."""
    quiet_megatron()
    try:
        loaded = load_checkpoint(path, device="cpu")
    except CheckpointError as e:
        raise CheckpointToolError(str(e)) from None
    except CheckpointException as e:  # a BaseException in torch: a missing or unreadable shard file
        raise CheckpointToolError(f"{path}: cannot load the model from this checkpoint: {_first_failure(e)}") from None
    state = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    tokenizer = loaded.tokenizer.model_bytes()
    return FullCheckpoint(state=state, meta=copy.deepcopy(loaded.meta), tokenizer=tokenizer,
                          source=str(loaded.checkpoint))


def _first_failure(e: BaseException) -> str:
    """The first rank's underlying error of torch's CheckpointException (e.g. the missing shard's path)."""
    failures = getattr(e, "failures", None) or {}
    for _, failure in sorted(failures.items()):
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(inner).__name__}: {inner}"
    return f"{type(e).__name__}: {e}"


def read_checkpoint(path: str | os.PathLike) -> FullCheckpoint:
    """A trainer checkpoint directory or a single `.safetensors` file written by `write_single_file`."""
    path = Path(path)
    if path.is_file():
        return read_single_file(path)
    if not path.exists():
        raise CheckpointToolError(f"{path}: no such checkpoint (a trainer checkpoint directory or a "
                                  f"{SINGLE_FILE_SUFFIX} file)")
    return read_trainer_checkpoint(path)


def read_info_parallel(path: str | os.PathLike) -> dict:
    """The `parallel` layout recorded in a trainer checkpoint's `checkpoint.json`."""
    record = read_record(path)
    if record is None:
        raise CheckpointToolError(f"{path}: no {MARKER}")
    return record.parallel or {}
