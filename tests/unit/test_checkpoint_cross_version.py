"""Checkpoints cross between the supported megatron-core releases: a run written under this interpreter's release
(0.16.1 in `.venv`, 0.19.2 in `.venv312`) computes the same logits under the other one, the other release resumes
training from it, and this release loads and resumes what the other wrote.

The other release is the other virtual environment of this checkout (`make install` / `make install-py312`), or
the interpreter named by MEGATRON_TASKMOE_OTHER_PYTHON; the test is skipped when it is absent (CI's first leg,
before `.venv312` exists; the second leg runs it).

Legend: B batch, T target length, V vocabulary.
"""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_run
from megatron_taskmoe.inference import find_checkpoint
from megatron_taskmoe.mcore_compat import mcore_version

HELPER = Path(__file__).resolve().parent / "cross_version_logits.py"
OTHER_PYTHON_ENV = "MEGATRON_TASKMOE_OTHER_PYTHON"
STEPS = 30  # tiny_run.shared_run's default: the run other tests share


def other_python() -> Path:
    named = os.environ.get(OTHER_PYTHON_ENV)
    if named:
        return Path(named)
    venv = ".venv" if sys.version_info[:2] == (3, 12) else ".venv312"
    return tiny_run.ROOT / venv / "bin" / "python"


def logits(python, checkpoint: Path, out: Path) -> tuple[str, np.ndarray]:
    """(megatron-core release, logits [B, T, V]) of `checkpoint` computed by `python`."""
    result = tiny_run.run([str(python), str(HELPER), str(checkpoint), str(out)], env_extra={"PYTHONPATH": str(
        tiny_run.ROOT)}, timeout=600)
    return result.stdout.strip().splitlines()[-1], np.load(out)


@pytest.mark.slow
def test_checkpoints_load_and_resume_across_megatron_core_releases(tmp_path_factory, tmp_path):
    other = other_python()
    if not other.exists():
        pytest.skip(f"no other megatron-core release to cross with ({other} is absent; set {OTHER_PYTHON_ENV})")
    root, run_dir = tiny_run.shared_run(tmp_path_factory)
    mine = mcore_version()

    # 1. Written here, loaded there: the same function.
    release, theirs_BTV = logits(other, run_dir, tmp_path / "theirs.npy")
    assert release != mine, f"{other} has the same megatron-core ({mine}): nothing crosses"
    _, mine_BTV = logits(sys.executable, run_dir, tmp_path / "mine.npy")
    np.testing.assert_allclose(theirs_BTV, mine_BTV, rtol=0, atol=1e-5)

    # 2. The other release resumes from it (model, distributed optimizer, scheduler, RNG and data position) and
    #    writes a checkpoint that this release reads with the same logits there and here.
    there = tmp_path / "resumed_there"
    shutil.copytree(run_dir, there)
    tiny_run.train(root, there, steps=STEPS + 2, python=str(other))
    assert find_checkpoint(there).step == STEPS + 2
    _, theirs_BTV = logits(other, there, tmp_path / "theirs2.npy")
    _, mine_BTV = logits(sys.executable, there, tmp_path / "mine2.npy")
    np.testing.assert_allclose(theirs_BTV, mine_BTV, rtol=0, atol=1e-5)
    assert np.abs(mine_BTV - np.load(tmp_path / "mine.npy")).max() > 0, "two more steps changed the model"

    # 3. This release resumes from what the other wrote.
    here = tmp_path / "resumed_here"
    shutil.copytree(there, here)
    tiny_run.train(root, here, steps=STEPS + 4)
    assert find_checkpoint(here).step == STEPS + 4
