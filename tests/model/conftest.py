"""The model tier's one-rank megatron world (gloo on CPU), set up once per test module."""

import pytest

from megatron_taskmoe.parallel import groups


@pytest.fixture(scope="module")
def megatron_world1():
    groups.init_distributed(rank=0, world_size=1)
    groups.initialize_model_parallel()
    groups.model_parallel_manual_seed(0)
    yield
    groups.destroy()
