"""`FullCheckpoint`, the parallelism-free representation every checkpoint tool works on, and its error type.

A `FullCheckpoint` holds full tensors named as in the single-process `EncoderDecoderModel` (TP = PP = EP = 1,
experts `...experts.local_experts.{e}...` with global e), the `checkpoint.json` record (model config, task map,
languages, tokenizer hash, ...) and the tokenizer's bytes. `reading` reads one from a trainer checkpoint or a single
file, `single_file` and `trainer_checkpoints` write one, `models` builds the one-process model that holds it.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_taskmoe.checkpoint.record import CheckpointRecord
from megatron_taskmoe.config_io import ConfigError, to_dict
from megatron_taskmoe.model.config import ModelConfig


class CheckpointToolError(ValueError):
    """A checkpoint or an option the tools cannot use as asked; the message names the file or the option."""


@dataclass(kw_only=True)
class FullCheckpoint:
    """A whole model in one process: full tensors, the checkpoint record and the tokenizer."""

    state: dict[str, torch.Tensor]
    """Full tensors under the single-process model's names."""
    meta: dict
    """`checkpoint.json`'s fields (`CheckpointRecord.to_dict()`): model_config, task_map, languages,
    tokenizer_sha256, parallel, step, ..."""
    tokenizer: Optional[bytes] = None
    """The sentencepiece model's bytes (None when the source carried none)."""
    source: str = ""
    """Where it was read from (or how it was made), for messages."""

    def record(self) -> CheckpointRecord:
        return CheckpointRecord.from_dict(self.meta, where=self.source)

    def model_config(self) -> ModelConfig:
        return model_config_from_meta(self.meta, self.source)

    def with_model_config(self, cfg: ModelConfig) -> "FullCheckpoint":
        meta = copy.deepcopy(self.meta)
        meta["model_config"] = to_dict(cfg)
        return FullCheckpoint(state=self.state, meta=meta, tokenizer=self.tokenizer, source=self.source)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())


def model_config_from_meta(meta: dict, where: str = "") -> ModelConfig:
    """The `ModelConfig` of a checkpoint record; CheckpointToolError naming `where` when there is none or it is
    invalid."""
    if "model_config" not in meta:
        raise CheckpointToolError(f"{where}: no model_config in the checkpoint record (not written by pretrain_mt.py)")
    try:
        return ModelConfig.from_record(meta["model_config"])
    except ConfigError as e:
        raise CheckpointToolError(f"{where}: {e}") from None


def quiet_megatron() -> None:
    """Silence megatron-core's import-time warnings and INFO logs in the tools' output."""
    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def check_state_matches(state: dict, shapes: dict[str, tuple], where: str) -> None:
    """CheckpointToolError naming `where` unless `state` has exactly the tensors and shapes of `shapes`."""
    check_shapes_match({k: tuple(v.shape) for k, v in state.items()}, shapes, where)


def check_shapes_match(found: dict[str, tuple], shapes: dict[str, tuple], where: str) -> None:
    """CheckpointToolError naming `where` unless the tensor shapes `found` are exactly `shapes`."""
    missing = sorted(set(shapes) - set(found))
    unexpected = sorted(set(found) - set(shapes))
    wrong = [f"{k}: {found[k]} vs {shapes[k]}" for k in sorted(set(found) & set(shapes)) if found[k] != shapes[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[:3]}")
        raise CheckpointToolError(f"{where}: the weights do not fit the model config: " + "; ".join(parts))


def describe(ckpt: FullCheckpoint) -> dict[str, Any]:
    """A short summary for the tools' logs and tests."""
    cfg = ckpt.model_config()
    return {"source": ckpt.source, "parameters": ckpt.num_parameters(), "tensors": len(ckpt.state),
            "tasks": ckpt.meta.get("task_map", {}).get("tasks"), "languages": ckpt.meta.get("languages"),
            "num_experts": cfg.moe.num_experts if cfg.moe else 0, "step": ckpt.meta.get("step"),
            "parallel": ckpt.meta.get("parallel")}


def isclose_state(a: dict, b: dict) -> float:
    """Largest absolute difference between two states with the same names (inf if names or shapes differ)."""
    if set(a) != set(b):
        return math.inf
    worst = 0.0
    for k in a:
        if a[k].shape != b[k].shape:
            return math.inf
        if a[k].numel():
            worst = max(worst, float((a[k].float() - b[k].float()).abs().max()))
    return worst
