"""megatron_taskmoe.parallel.groups at world size 1: process groups from a validated `ParallelConfig`, and
`init_distributed`'s argument checks. (Layouts over several processes: tests/distributed/.)"""

import pytest
import torch

from megatron_taskmoe.model.config import ParallelConfig
from megatron_taskmoe.parallel import groups


def test_initialize_model_parallel_returns_process_groups_and_validates_sizes():
    groups.init_distributed(rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="world size 1 is not divisible by ParallelConfig.tensor x "
                                             "ParallelConfig.pipeline = 2 x 1"):
            groups.initialize_model_parallel(ParallelConfig(tensor=2))
        pgs = groups.initialize_model_parallel()
        assert pgs.tp.size() == 1 and pgs.ep.size() == 1 and pgs.dp.size() == 1
    finally:
        groups.destroy()


def test_parallel_size_messages():
    with pytest.raises(ValueError, match="ParallelConfig.expert x expert_tensor = 4 x 1 must divide data x tensor "
                                         r"parallel = 2 x 1 \(world size 2, ParallelConfig.pipeline=1\)"):
        ParallelConfig(expert=4, expert_tensor=1).validate_world_size(2)
    with pytest.raises(ValueError, match="ParallelConfig.pipeline=0 must be a positive integer"):
        ParallelConfig(pipeline=0)
    with pytest.raises(ValueError, match=r"encoder_pipeline_stages must be in \[1, 1\], got None"):
        ParallelConfig(pipeline=2).validate_world_size(2)
    ParallelConfig(tensor=2, expert=2).validate_world_size(4)
    ParallelConfig(pipeline=2, encoder_pipeline_stages=1).validate_world_size(2)


def test_embedding_ranks_of_a_pipeline_group():
    assert groups.embedding_ranks([3, 7, 11, 15], encoder_stages=2) == [3, 11, 15]
    assert groups.embedding_ranks([1, 5], encoder_stages=1) == [1, 5]
    assert groups.embedding_ranks([2], encoder_stages=1) == [2]
    assert groups.position_embedding_ranks([3, 7, 11, 15], encoder_stages=2) == [3, 11]
    assert groups.position_embedding_ranks([0, 1, 2], encoder_stages=1) == [0, 1]


def test_init_distributed_checks_rank_and_port(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        groups.init_distributed(rank=2, world_size=2, master_port=1)
    with pytest.raises(ValueError, match="needs master_port"):
        groups.init_distributed(rank=0, world_size=2)
    assert not torch.distributed.is_initialized()
