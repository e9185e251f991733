"""Atomic, resumable checkpoints on top of megatron-core's distributed checkpointing.

Every rank writes into the `.partial.` directory; after a barrier rank 0 writes the tokenizer and `checkpoint.json`
and renames the directory to its final name, then updates `latest`. A crash at any point leaves either the previous
complete checkpoint set untouched or a `.partial.` directory that `list_checkpoints` ignores. A directory counts
as complete only if it has `checkpoint.json`, so a rename that raced with a crash is still safe.

Retention keeps the last `keep_last` checkpoints plus the `keep_best` best by the record's metric (validation BLEU).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_taskmoe.checkpoint.format import (LATEST, MARKER, PARTIAL_PREFIX, RANK_STATE_DIR, checkpoint_name,
                                                rank_state_name)
from megatron_taskmoe.checkpoint.record import CheckpointRecord, read_record, write_record, write_text_synced


@dataclass(kw_only=True)
class CheckpointInfo:
    """A complete checkpoint directory and its record."""

    path: Path
    """The checkpoint directory (`ROOT/step_XXXXXXXX`)."""
    record: CheckpointRecord
    """Its `checkpoint.json`."""

    @property
    def step(self) -> int:
        return int(self.record.step)

    @property
    def metric(self) -> Optional[float]:
        return self.record.metric

    @property
    def meta(self) -> dict:
        """`checkpoint.json` as a dict (a fresh copy)."""
        return self.record.to_dict()


def read_info(path: str | os.PathLike) -> Optional[CheckpointInfo]:
    """The info of a complete checkpoint directory, or None if it is not one."""
    record = read_record(path)
    return CheckpointInfo(path=Path(path), record=record) if record is not None else None


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
    """A checkpoint directory, or a root whose latest complete checkpoint is taken; FileNotFoundError otherwise."""
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves and finds checkpoints under one root; see the module docstring for the layout and guarantees.

    `save_fn(directory)` writes the sharded part (all ranks call it collectively), typically `state.save_state`.
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

    def save(self, record: CheckpointRecord, save_fn: Callable[[Path], None], *, rank_state: Optional[dict] = None,
             tokenizer: Optional[str | os.PathLike] = None) -> Path:
        """Collective: every rank calls it. Saves the checkpoint of `record.step` with `record` as its
        `checkpoint.json` and a copy of the `tokenizer` file; returns the final checkpoint path."""
        if record.step is None:
            raise ValueError("CheckpointManager.save: the record has no step")
        final = self.root / checkpoint_name(record.step)
        partial = self.root / f"{PARTIAL_PREFIX}{checkpoint_name(record.step)}"
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
            (partial / RANK_STATE_DIR).mkdir(exist_ok=True)
            torch.save(rank_state, partial / RANK_STATE_DIR / rank_state_name(_rank()))
        _barrier()
        if _rank() == 0:
            write_record(partial, record, Path(tokenizer).read_bytes() if tokenizer is not None else None)
            os.replace(partial, final)
            write_text_synced(self.root / LATEST, final.name + "\n")
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


def load_rank_state(checkpoint: str | os.PathLike, rank: Optional[int] = None) -> Optional[dict]:
    """This rank's non-reshardable state, or None when the checkpoint was saved with another world layout."""
    path = Path(checkpoint) / RANK_STATE_DIR / rank_state_name(_rank() if rank is None else rank)
    if not path.is_file():
        return None
    return torch.load(path, weights_only=False)
