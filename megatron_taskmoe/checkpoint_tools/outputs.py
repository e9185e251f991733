"""Atomic outputs of the tools: a result appears at its path only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from megatron_taskmoe.checkpoint.format import PARTIAL_PREFIX
from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """`path` as an output: CheckpointToolError when it exists (unless `overwrite`) or its parent does not."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointToolError(f"{path}: already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise CheckpointToolError(f"{path.parent}: output's parent directory does not exist")
    return path


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty `.partial.NAME` sibling of `final`; renamed to `final` on success, removed on error."""
    final = check_output(final, overwrite)
    partial = final.parent / f"{PARTIAL_PREFIX}{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
