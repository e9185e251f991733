"""Atomic output for the tools: a file is written to a temporary sibling and renamed only when complete, so an
interrupted tool never leaves a half-written result where a complete one is expected."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_atomically(path: Path, write, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        write(fd, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""

    def write(fd, _tmp):
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)

    return _replace_atomically(Path(path), write)


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG to `path` atomically."""

    def write(fd, tmp):
        os.close(fd)
        fig.savefig(tmp, format="png", dpi=dpi)

    return _replace_atomically(Path(path), write, suffix=".png")
