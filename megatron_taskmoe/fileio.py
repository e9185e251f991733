"""Atomic output for the tools: a file is written to a temporary sibling and renamed only when complete, so an
interrupted tool never leaves a half-written result where a complete one is expected."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write_to: Callable[[str], None], *, suffix: str = "") -> Path:
    """Have `write_to(tmp)` write a temporary sibling of `path`, then rename it to `path`; on any error the
    temporary file is removed and `path` is untouched. The result gets the usual (umask) permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write_to(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG to `path` atomically."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), suffix=".png")
