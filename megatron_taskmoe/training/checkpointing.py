"""Atomic, resumable checkpoints on top of megatron-core's distributed checkpointing.

Layout of a checkpoint root:

    ROOT/latest                  name of the newest complete checkpoint (replaced atomically)
    ROOT/step_00000100/          a complete checkpoint:
        (megatron-core dist_checkpointing files: model and optimizer, sharded, reshardable on load)
        rank_state/rank_00003.pt  per-rank state that cannot be resharded (RNG states)
        checkpoint.json           our completion marker and summary, written last
    ROOT/.partial.step_00000200/ a save in progress (or one that crashed): never listed, removed by the next save

Every rank writes into the `.partial.` directory; after a barrier rank 0 writes `checkpoint.json` and renames the
directory to its final name, then updates `latest`. A crash at any point leaves either the previous complete
checkpoint set untouched or a `.partial.` directory that `list_checkpoints` ignores. A directory counts as complete
only if it has `checkpoint.json`, so a rename that raced with a crash is still safe.

Retention keeps the last `keep_last` checkpoints plus the `keep_best` best by a metric (validation BLEU).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial."


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(kw_only=True)
class CheckpointInfo:
    """What `checkpoint.json` records about a complete checkpoint."""

    path: Path
    step: int
    metric: Optional[float] = None
    meta: dict = field(default_factory=dict)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_info(path: Path) -> Optional[CheckpointInfo]:
    """The info of a complete checkpoint directory, or None if it is not one."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return CheckpointInfo(path=Path(path), step=int(meta["step"]), metric=meta.get("metric"), meta=meta)


def list_checkpoints(root: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete checkpoints under `root`, oldest first; partial saves are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    infos = []
    for child in root.iterdir():
        if child.name.startswith(PARTIAL_PREFIX) or not child.is_dir():
            continue
        info = read_info(child)
        if info is not None:
            infos.append(info)
    return sorted(infos, key=lambda i: i.step)


def latest_checkpoint(root: str | os.PathLike) -> Optional[CheckpointInfo]:
    """The newest complete checkpoint: `latest` if it points at a complete one, else the highest step."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        info = read_info(root / pointer.read_text(encoding="utf-8").strip())
        if info is not None:
            return info
    infos = list_checkpoints(root)
    return infos[-1] if infos else None


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """A checkpoint directory, or a root whose latest complete checkpoint is taken; clear error otherwise."""
    path = Path(path)
    info = read_info(path)
    if info is None:
        info = latest_checkpoint(path)
    if info is None:
        raise FileNotFoundError(
            f"{path}: no complete checkpoint here (a checkpoint directory has {MARKER}; "
            f"directories named {PARTIAL_PREFIX}* are unfinished saves)"
        )
    return info


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core import tensor_parallel

        state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception as e:  # the tracker is optional (not initialised in some tools)
        log.debug("no megatron RNG tracker state saved: %s", e)
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves and finds checkpoints under one root; see the module docstring for the layout and guarantees.

    `save_fn(directory)` writes the sharded part (all ranks call it collectively), typically megatron-core's
    `dist_checkpointing.save(sharded_state_dict, directory)`.
    """

    def __init__(self, root: str | os.PathLike, *, keep_last: int = 2, keep_best: int = 1,
                 higher_is_better: bool = True):
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        if keep_best < 0:
            raise ValueError(f"checkpoint keep_best must be >= 0, got {keep_best}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.higher_is_better = higher_is_better

    def save(self, step: int, save_fn: Callable[[Path], None], *, rank_state: Optional[dict] = None,
             meta: Optional[dict] = None, metric: Optional[float] = None) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint path."""
        final = self.root / checkpoint_name(step)
        partial = self.root / f"{PARTIAL_PREFIX}{checkpoint_name(step)}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(PARTIAL_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            partial.mkdir(parents=True)
        _barrier()
        save_fn(partial)  # into an empty directory: megatron warns about "overwriting" otherwise
        if rank_state is not None:
            (partial / "rank_state").mkdir(exist_ok=True)
            torch.save(rank_state, partial / "rank_state" / f"rank_{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            record = {"step": step, "metric": metric, **(meta or {})}
            _write_text_atomic(partial / MARKER, json.dumps(record, indent=2, sort_keys=True))
            os.replace(partial, final)
            _write_text_atomic(self.root / LATEST, final.name + "\n")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        infos = list_checkpoints(self.root)
        keep = {i.path for i in infos[-self.keep_last:]}
        scored = [i for i in infos if i.metric is not None]
        scored.sort(key=lambda i: i.metric, reverse=self.higher_is_better)
        keep |= {i.path for i in scored[: self.keep_best]}
        for info in infos:
            if info.path not in keep:
                shutil.rmtree(info.path, ignore_errors=True)

    def best(self) -> Optional[CheckpointInfo]:
        scored = [i for i in list_checkpoints(self.root) if i.metric is not None]
        if not scored:
            return None
        return (max if self.higher_is_better else min)(scored, key=lambda i: i.metric)


def load_rank_state(checkpoint: Path, rank: Optional[int] = None) -> Optional[dict]:
    """This rank's non-reshardable state, or None when the checkpoint was saved with another world layout."""
    path = Path(checkpoint) / "rank_state" / f"rank_{_rank() if rank is None else rank:05d}.pt"
    if not path.is_file():
        return None
    return torch.load(path, weights_only=False)
