"""The permutation kernels' output-cache limit read from the environment (TASKMOE_OPS_CACHE_MB) when the extension
loads, so in a fresh Python process; the cache itself: tests/unit/test_permute_output_cache.py."""

import os
import subprocess
import sys

import pytest

from megatron_taskmoe import ops


@pytest.fixture(autouse=True)
def _require_extension():
    assert ops.extension_available(), "megatron_taskmoe.ops._permute_ext is not built"


def test_cache_limit_from_environment():
    script = (
        "import torch, megatron_taskmoe.ops._permute_ext\n"
        "try:\n"
        "    torch.ops.taskmoe.gather_rows(torch.zeros(1024, 1024), torch.arange(1024), None)\n"
        "except RuntimeError as error:\n"
        "    print('error:', error)\n"
    )
    env = dict(os.environ, TASKMOE_OPS_CACHE_MB="lots", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "TASKMOE_OPS_CACHE_MB must be a non-negative integer" in out.stdout and "'lots'" in out.stdout
