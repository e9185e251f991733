"""Shared pytest setup and fixtures; helpers live in `tests/helpers/` (imported as `tests.helpers.*`).

Tiers, cheapest first: unit (no subprocess, no process group), model (an in-process one-rank process group for
megatron-core models), integration (the CLIs and `pretrain_mt.py` as subprocesses), distributed (gloo, several
processes), learning (every system trained until it learns) and gpu (marker `gpu`, skipped without CUDA).
"""

import os

import pytest
import torch

from megatron_taskmoe import compat
from tests.helpers.corpus import build_bible_data

# Tests are tiny; one intra-op thread per process keeps multi-process tests from oversubscribing 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# megatron-core prepared for this machine once, as every process of the project does at start (spawned workers
# call it themselves: tests/helpers/harness.py).
compat.apply()


TIERS = ("unit", "model", "integration", "distributed", "learning", "gpu")


def pytest_collection_modifyitems(config, items):
    # every test carries its tier's marker (the directory it lives in), so `-m "unit or model"` selects tiers
    tests_dir = config.rootpath / "tests"
    for item in items:
        parts = item.path.relative_to(tests_dir).parts
        if parts[0] in TIERS:
            item.add_marker(parts[0])
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bible_data(tmp_path_factory):
    """Real data (Bible en<->de, en<->fr) preprocessed for trainer tests; see tests/helpers/corpus.py."""
    return build_bible_data(tmp_path_factory.mktemp("bible"))
