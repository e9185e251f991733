"""`CheckpointRecord`: what `checkpoint.json` holds, and reading and writing it.

The trainer writes one record per checkpoint; the checkpoint tools (convert, merge, extract) write records of their
outputs with a note of where they came from. Every field but `step` may be missing from a file and then reads as
None (e.g. a record without `optimizer_chains`, or a tool's record without `consumed_samples`). Keys this module
does not know are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_taskmoe.checkpoint.format import MARKER, TOKENIZER_FILE
from megatron_taskmoe.fileio import write_atomic
from megatron_taskmoe.model.config import ModelConfig


class CheckpointFormatError(ValueError):
    """A `checkpoint.json` that cannot be read as a record; the message names the file and the field."""


@dataclass(kw_only=True)
class CheckpointRecord:
    """The contents of `checkpoint.json`."""

    step: Optional[int] = None
    """Optimizer steps taken when the checkpoint was saved (0 for tool outputs that start a new run)."""
    metric: Optional[float] = None
    """The validation metric at this save (BLEU; higher is better), None when the save did not follow a validation.
    Always written (as null when None)."""
    task_map: Optional[dict] = None
    """{"mode", "tasks": [names in id order], "direction_to_task": {"de-en": id, ...}} of the corpus manifest."""
    languages: Optional[list] = None
    """Sorted language codes; a language's id is its index."""
    tokenizer_sha256: Optional[str] = None
    """sha256 of the sentencepiece model the run trained with (the copy beside the record must match)."""
    model_config: Optional[dict] = None
    """The `ModelConfig` as a record (`config_io.to_dict`); `model_config()` builds it."""
    parallel: Optional[dict] = None
    """The `ParallelConfig` the checkpoint was saved with (sizes of TP, PP, EP, ETP)."""
    consumed_samples: Optional[int] = None
    """The data stream position (global samples consumed) at this save."""
    optimizer_chains: Optional[int] = None
    """How many chained optimizers saved their state (dense, then experts); None when the record does not say (the
    saved optimizer state itself tells: `state.saved_with_chained_optimizer`)."""
    converted_from: Optional[dict] = None
    """Written by the conversion tool: the source checkpoint's path and layout, whether Adam's moments were kept."""
    merged_from: Optional[dict] = None
    """Written by the merge tool: the two source checkpoints, their tasks, the weight and adapter rows."""
    extracted: Optional[dict] = None
    """Written by the extraction tool: the source, the kept tasks/directions/languages, layers and parameter counts."""
    extra: dict = field(default_factory=dict)
    """Keys this version does not know, as read (written back unchanged)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every field that is set, `metric` always, then the `extra` keys."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is not None or f.name == "metric":
                out[f.name] = value
        return {**self.extra, **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, where: str = MARKER) -> "CheckpointRecord":
        """A record from a JSON object; CheckpointFormatError (naming `where` and the field) on a wrong type."""
        if not isinstance(data, dict):
            raise CheckpointFormatError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        for name, kind in _TYPES.items():
            value = values.get(name)
            if value is not None and not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise CheckpointFormatError(f"{where}: field {name!r} is {value!r}, expected {_TYPE_NAMES[name]}")
        if values.get("metric") is not None:
            values["metric"] = float(values["metric"])
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, text: str, where: str = MARKER) -> "CheckpointRecord":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointFormatError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(data, where)

    def model(self) -> ModelConfig:
        """The recorded `ModelConfig` (fields added since the record was written take their record defaults);
        ConfigError on an invalid record, CheckpointFormatError when there is none."""
        if self.model_config is None:
            raise CheckpointFormatError("no model_config in the checkpoint record (not written by pretrain_mt.py)")
        return ModelConfig.from_record(self.model_config)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "step": int, "metric": (int, float), "task_map": dict, "languages": list, "tokenizer_sha256": str,
    "model_config": dict, "parallel": dict, "consumed_samples": int, "optimizer_chains": int,
    "converted_from": dict, "merged_from": dict, "extracted": dict,
}
_TYPE_NAMES = {name: " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
               for name, kind in _TYPES.items()}


def read_record(directory: str | os.PathLike) -> Optional[CheckpointRecord]:
    """The record of a complete checkpoint directory; None when it has no readable `checkpoint.json` or the
    record has no step (not a checkpoint)."""
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return None
    try:
        record = CheckpointRecord.from_json(marker.read_text(encoding="utf-8"), where=str(marker))
    except (OSError, CheckpointFormatError):
        return None
    return record if record.step is not None else None


def _write_synced(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_text_synced(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically and flushed to disk (the marker and the `latest` pointer)."""
    return write_atomic(path, lambda tmp: _write_synced(tmp, text))


def write_record(directory: str | os.PathLike, record: CheckpointRecord, tokenizer: Optional[bytes] = None) -> None:
    """`checkpoint.json` (and the tokenizer's bytes as `tokenizer.model`) into a checkpoint directory being written;
    the record last, as it marks the directory complete."""
    directory = Path(directory)
    if tokenizer is not None:
        (directory / TOKENIZER_FILE).write_bytes(tokenizer)
    write_text_synced(directory / MARKER, record.to_json())
