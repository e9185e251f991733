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

from megatron_taskmoe.compat.versions import mcore_version
from megatron_taskmoe.inference import find_checkpoint
from tests.helpers import tiny_run

HELPER = "tests.helpers.cross_version_logits"  # run as a module from the repository root
OTHER_PYTHON_ENV = "MEGATRON_TASKMOE_OTHER_PYTHON"
STEPS = 30  # tiny_run.shared_run's default: the run other tests share


def other_python() -> Path:
    named = os.environ.get(OTHER_PYTHON_ENV)
    if named:
        return Path(named)
    venv = ".venv" if sys.version_info[:2] == (3, 12) else ".venv312"
    return tiny_run.ROOT / venv / "bin" / "python"


def logits(python, out_dir: Path, *checkpoints: Path) -> tuple[str, list[np.ndarray]]:
    """(megatron-core release, logits [B, T, V] of each checkpoint) computed by `python` in one process."""
    result = tiny_run.run([str(python), "-m", HELPER, str(out_dir), *map(str, checkpoints)],
                          env_extra={"PYTHONPATH": str(tiny_run.ROOT)}, timeout=600)
    return result.stdout.strip().splitlines()[-1], [np.load(out_dir / f"{i}.npy") for i in range(len(checkpoints))]


@pytest.mark.slow
def test_checkpoints_load_and_resume_across_megatron_core_releases(tmp_path_factory, tmp_path):
    other = other_python()
    if not other.exists():
        pytest.skip(f"no other megatron-core release to cross with ({other} is absent; set {OTHER_PYTHON_ENV})")
    root, written_here = tiny_run.shared_run(tmp_path_factory)
    mine = mcore_version()

    # The other release resumes from this release's checkpoint (model, distributed optimizer, scheduler, RNG and
    # data position) for two steps and writes its own.
    written_there = tmp_path / "resumed_there"
    shutil.copytree(written_here, written_there)
    tiny_run.train(root, written_there, steps=STEPS + 2, python=str(other))
    assert find_checkpoint(written_there).step == STEPS + 2

    # Both checkpoints compute the same function under both releases.
    release, theirs = logits(other, tmp_path / "there", written_here, written_there)
    assert release != mine, f"{other} has the same megatron-core ({mine}): nothing crosses"
    _, ours = logits(sys.executable, tmp_path / "here", written_here, written_there)
    for a_BTV, b_BTV in zip(theirs, ours):
        np.testing.assert_allclose(a_BTV, b_BTV, rtol=0, atol=1e-5)
    assert np.abs(ours[1] - ours[0]).max() > 0, "two more steps changed the model"

    # This release resumes from what the other wrote.
    resumed_here = tmp_path / "resumed_here"
    shutil.copytree(written_there, resumed_here)
    tiny_run.train(root, resumed_here, steps=STEPS + 4)
    assert find_checkpoint(resumed_here).step == STEPS + 4
