"""The sharded state dict of model + optimizer, saved and loaded through megatron-core's dist_checkpointing.

Both the model's and the optimizer's entries carry their global offsets (`format.MODEL_CKPT_METADATA`,
`format.OPTIMIZER_CKPT_METADATA`), so a checkpoint saved under one TP/PP/EP/DP layout loads under any other. The
optimizer is megatron-core's (possibly chained) distributed optimizer: dense parameters, then expert parameters
when the model has MoE layers; the trainer and the checkpoint tools build it and hand it in.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from megatron.core import dist_checkpointing

from megatron_taskmoe.checkpoint.format import MODEL_CKPT_METADATA, OPTIMIZER_CKPT_METADATA
from megatron_taskmoe.model.config import ModelConfig


def optimizers(optimizer) -> list:
    """megatron-core's chained optimizers: dense, then expert parameters (when the model has MoE layers)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_chains(model_cfg: ModelConfig) -> int:
    """How many chained optimizers the trainer builds for `model_cfg` under any layout (dense, then expert
    parameters, which always have their own optimizer); recorded as `optimizer_chains` in checkpoint.json."""
    return 2 if model_cfg.num_moe_layers() > 0 else 1


def model_sharded_state_dict(module) -> dict:
    """The bare model's sharded state dict (no DDP/Float16 prefixes), one entry per layer by its global number."""
    return module.sharded_state_dict(metadata=MODEL_CKPT_METADATA)


def sharded_state_dict(module, optimizer=None, *, is_loading: bool = False) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} of a run (the optimizer part only when `optimizer` is given); fully
    reshardable optimizer state in model space."""
    model_sd = model_sharded_state_dict(module)
    sharded: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                            metadata=OPTIMIZER_CKPT_METADATA)
    return sharded


def materialize_optimizer_state(optimizer) -> None:
    """Create Adam's state where it does not exist yet: the loading template needs the tensors (a load overwrites
    them)."""
    for opt in optimizers(optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def zero_optimizer_state(optimizer) -> None:
    """Adam's state as at step 0 (zero moments, step counters 0), materialised: a fresh start."""
    materialize_optimizer_state(optimizer)
    for opt in optimizers(optimizer):
        for state in opt.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    value.zero_()
                elif key == "step":
                    state[key] = 0
        for group in opt.optimizer.param_groups:
            if "step" in group:
                group["step"] = 0


def saved_with_chained_optimizer(directory: str | os.PathLike) -> bool:
    """Whether the optimizer state in a saved checkpoint comes from a chained optimizer (`chained_{i}.` keys,
    nested) rather than a single one (flat keys): megatron cannot map one structure onto the other."""
    return any(k.startswith("chained_") for k in dist_checkpointing.load_tensors_metadata(str(directory)))


def _without_dp0_state(common: dict) -> dict:
    """The memory-efficient fully-reshardable optimizer format keeps `param_state` on data-parallel rank 0 only;
    leave it out of megatron's cross-rank consistency check of the common state (it is expected to differ)."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "param_state"}
        return node

    return {k: (strip(v) if k == "optimizer" else v) for k, v in common.items()}


def save_state(sharded: dict, directory: str | os.PathLike) -> None:
    """Collective: save a sharded state dict (`sharded_state_dict` plus plain entries such as the scheduler's state)
    into an empty directory."""
    dist_checkpointing.save(sharded, str(directory), preprocess_common_before_consistancy_check=_without_dp0_state)


def load_state(sharded: dict, directory: str | os.PathLike) -> dict:
    """Collective: load the entries of a sharded state dict template (plain entries given as None come from the
    common state) from a saved checkpoint, resharded to this process's layout."""
    return dist_checkpointing.load(sharded, str(directory))


def load_common_state(directory: str | os.PathLike) -> dict:
    """The plain (non-sharded) entries of a saved checkpoint: scheduler, train_state, ..."""
    return dist_checkpointing.load_common_state_dict(str(directory))


def load_model_weights(module, directory: str | os.PathLike) -> None:
    """Load only the model part of a saved checkpoint into `module` (strict: every tensor must be there)."""
    loaded = load_state({"model": model_sharded_state_dict(module)}, directory)
    module.load_state_dict(loaded["model"], strict=True)

