"""What the benchmark scripts that drive the repository's own tools share: running one as a logged subprocess."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], log: Path, env: Optional[dict] = None) -> float:
    """Run `cmd` in the repository root with output to `log`; raise naming the log on failure; return seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed with exit {rc}; see {log}:\n" + "\n".join(tail))
    return time.perf_counter() - start
