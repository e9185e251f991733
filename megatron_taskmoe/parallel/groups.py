"""Process groups, seeding and the device, the same way on CPU (gloo) and GPU (nccl).

* `init_distributed` sets up torch.distributed's default group; `initialize_model_parallel` megatron's
  model-parallel groups for a `ParallelConfig` (sizes checked by `ParallelConfig.validate_world_size`), with the
  encoder-decoder's embedding groups under pipelining (`embedding_ranks`, `position_embedding_ranks`: the stages
  holding a copy of the shared word embedding, and those that embed positions, so megatron's
  `finalize_model_grads` all-reduces the tied gradients across them); `destroy` tears everything down.
* `model_parallel_manual_seed` seeds torch and megatron's tensor-parallel RNG tracker.
* `device()` is where this process's tensors live.

They need megatron-core prepared for this machine first (`megatron_taskmoe.compat.apply()` at process start) and
raise a RuntimeError saying so otherwise.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import random as mp_random

from megatron_taskmoe import compat
from megatron_taskmoe.model.config import ParallelConfig


def device() -> torch.device:
    """The device tensors of this process live on: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port free on this host right now (for single-host gloo runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    master_addr: Optional[str] = None,
    master_port: Optional[int] = None,
    backend: Optional[str] = None,
    timeout_minutes: float = 10.0,
) -> None:
    """Initialize torch.distributed's default group: gloo on CPU, nccl on GPU.

    Rank and world size come from the arguments, else from torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
    MASTER_PORT, else a single process. Does nothing if already initialized."""
    compat.require_applied("init_distributed")
    if torch.distributed.is_initialized():
        return
    env = os.environ
    rank = int(env.get("RANK", 0)) if rank is None else rank
    world_size = int(env.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"init_distributed: rank {rank} is outside world size {world_size}")
    master_addr = master_addr or env.get("MASTER_ADDR", "127.0.0.1")
    if master_port is None:
        if "MASTER_PORT" not in env and world_size > 1:
            raise ValueError("init_distributed: world_size > 1 needs master_port= or the MASTER_PORT variable")
        master_port = int(env.get("MASTER_PORT", 0)) or free_port()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
    torch.distributed.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def embedding_ranks(pp_ranks: list[int], encoder_stages: int) -> list[int]:
    """Ranks of one pipeline group holding a copy of the shared word embedding: first encoder, first decoder and
    last stage (megatron's `get_embedding_ranks`)."""
    if len(pp_ranks) == 1:
        return [pp_ranks[0]]
    return sorted({pp_ranks[0], pp_ranks[encoder_stages], pp_ranks[-1]})


def position_embedding_ranks(pp_ranks: list[int], encoder_stages: int) -> list[int]:
    """Ranks of one pipeline group that embed positions: the first encoder and the first decoder stage."""
    if len(pp_ranks) == 1:
        return [pp_ranks[0]]
    return sorted({pp_ranks[0], pp_ranks[encoder_stages]})


def initialize_model_parallel(parallel: Optional[ParallelConfig] = None) -> ProcessGroupCollection:
    """megatron's process groups for `parallel` (default: no model parallelism), with the encoder-decoder's
    embedding groups under pipelining; returns the `ProcessGroupCollection`. Call after `init_distributed`."""
    compat.require_applied("initialize_model_parallel")
    if not torch.distributed.is_initialized():
        raise RuntimeError("initialize_model_parallel: call init_distributed() first")
    parallel = parallel or ParallelConfig()
    parallel.validate_world_size(torch.distributed.get_world_size())
    kwargs: dict[str, Any] = {}
    if parallel.pipeline > 1:
        enc = parallel.encoder_pipeline_stages
        kwargs = dict(get_embedding_ranks=functools.partial(embedding_ranks, encoder_stages=enc),
                      get_position_embedding_ranks=functools.partial(position_embedding_ranks, encoder_stages=enc))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor,
        **kwargs,
    )
    return ProcessGroupCollection.use_mpu_process_groups()


def model_parallel_manual_seed(seed: int) -> None:
    """Seed torch and megatron's RNG tracker (data-, tensor- and expert-parallel streams), on CPU or GPU.

    The CPU generator gets `seed` on every rank, so `use_cpu_initialization` builds identical full weights
    everywhere before megatron slices them; dropout streams differ per TP/EP rank as megatron intends."""
    compat.require_applied("model_parallel_manual_seed")
    torch.manual_seed(seed)
    mp_random.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    # The tracker's "add" seeds the default generator as a side effect on CPU; restore the plain seed.
    torch.manual_seed(seed)


def destroy() -> None:
    """Destroy megatron's model-parallel state, its global buffers and torch.distributed's default group."""
    parallel_state.destroy_model_parallel()
    mp_random.initialize_rng_tracker(force_reset=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
