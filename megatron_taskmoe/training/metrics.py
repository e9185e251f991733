"""Run metrics: `metrics.jsonl` (one JSON object per logged step or evaluation) and TensorBoard.

`metrics.jsonl` is the machine-readable record that scripts compare runs by. Each line has a `kind` ("train",
"eval" or "routing"), the `step`, and flat numeric fields; nested mappings (per-task BLEU) are kept as mappings in the
JSON line and flattened to `a/b` tags for TensorBoard. A writer may instead name the TensorBoard scalars itself and
add histograms (the routing telemetry: `training/routing_telemetry.py`). Only the logging rank (rank 0) writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[prefix] = float(value)


class MetricsWriter:
    """Appends records to `run_dir/metrics.jsonl` and mirrors scalars to TensorBoard (`run_dir/tensorboard`)."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard only when enabled: its import is slow

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, kind: str, step: int, *, tb_scalars: Optional[Mapping[str, float]] = None,
              tb_histograms: Optional[Mapping[str, Sequence[float]]] = None, **fields: Any) -> None:
        """One JSON line {"kind", "step", **fields}. TensorBoard gets the fields' numbers (flattened to `kind/a/b`
        tags), or `tb_scalars` instead when given, and `tb_histograms`: {tag: counts per index}, drawn as a
        histogram over the indexes (e.g. tokens per expert)."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **fields}
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            scalars: dict[str, float] = {}
            if tb_scalars is None:
                _flatten(kind, fields, scalars)
            else:
                _flatten("", tb_scalars, scalars)
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            for tag, counts in (tb_histograms or {}).items():
                self._index_histogram(tag, counts, step)

    def _index_histogram(self, tag: str, counts: Sequence[float], step: int) -> None:
        """A histogram whose bucket i holds counts[i] (value i): TensorBoard's raw histogram, one bucket per index."""
        used = [i for i, c in enumerate(counts) if c > 0]
        if not used:
            return
        total = float(sum(counts))
        self._tb.add_histogram_raw(
            tag, min=float(used[0]), max=float(used[-1]), num=total,
            sum=float(sum(i * c for i, c in enumerate(counts))),
            sum_squares=float(sum(i * i * c for i, c in enumerate(counts))),
            bucket_limits=[i + 0.5 for i in range(len(counts))], bucket_counts=[float(c) for c in counts],
            global_step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | os.PathLike, kind: Optional[str] = None) -> list[dict]:
    """All records of `metrics.jsonl` (optionally of one kind), in order."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
