"""Shared pytest setup: tiers are unit (no process group), distributed (gloo, several processes) and gpu."""

import os

import pytest
import torch

from megatron_taskmoe import compat

# Tests are tiny; one intra-op thread per process keeps multi-process tests from oversubscribing 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# megatron-core prepared for this machine once, as every process of the project does at start (spawned workers
# call it themselves: tests/distributed/_harness.py).
compat.apply()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bible_data(tmp_path_factory):
    """Real data (Bible en<->de, en<->fr) preprocessed for trainer tests; see tests/helpers/corpus.py."""
    from tests.helpers.corpus import build_bible_data

    return build_bible_data(tmp_path_factory.mktemp("bible"))
