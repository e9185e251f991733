"""megatron's process groups for a model in one process (TP = PP = EP = 1): inference and the checkpoint tools."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_taskmoe.parallel import groups


class MultiProcessError(RuntimeError):
    """A one-process model was asked for inside a multi-process job."""


def one_process_groups(device: Optional[torch.device] = None):
    """The process groups of a one-process model, created when no distributed job is running (gloo, or NCCL when
    `device` is a CUDA device); the existing ones when this process already initialised them.

    MultiProcessError when torch.distributed runs more than one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise MultiProcessError(
            "a single-process model (TP=PP=EP=1) is built here but torch.distributed runs "
            f"{dist.get_world_size()} processes; call it outside a multi-process job (not under torchrun)")
    if not dist.is_initialized():
        backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
        groups.init_distributed(rank=0, world_size=1, master_port=groups.free_port(), backend=backend)
    if not parallel_state.model_parallel_is_initialized():
        return groups.initialize_model_parallel()
    return ProcessGroupCollection.use_mpu_process_groups()
