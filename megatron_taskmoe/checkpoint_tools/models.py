"""The one-process `EncoderDecoderModel` of a `FullCheckpoint` (TP = PP = EP = 1, CPU, eval mode)."""

from __future__ import annotations

import torch

from megatron_taskmoe.checkpoint.process_groups import MultiProcessError, one_process_groups
from megatron_taskmoe.checkpoint_tools.full import (CheckpointToolError, FullCheckpoint, check_shapes_match,
                                                   check_state_matches, model_config_from_meta, quiet_megatron)
from megatron_taskmoe.checkpoint_tools.single_file import TOKENIZER_KEY, open_tensors, read_meta
from megatron_taskmoe.model.config import ModelConfig, ParallelConfig, to_transformer_config
from megatron_taskmoe.model.encdec import EncoderDecoderModel


def tool_process_groups():
    """megatron's one-process groups for a tool; CheckpointToolError inside a multi-process job."""
    quiet_megatron()
    try:
        return one_process_groups()
    except MultiProcessError as e:
        raise CheckpointToolError(f"the checkpoint tools run in one process: {e}") from None


def build_model(model_cfg: ModelConfig):
    """The one-process `EncoderDecoderModel` (eval mode, CPU), weights uninitialized (they are loaded next)."""
    pg = tool_process_groups()
    tconfig = to_transformer_config(model_cfg, ParallelConfig(), perform_initialization=False)
    return EncoderDecoderModel(model_cfg, ParallelConfig(), pg_collection=pg, transformer_config=tconfig).eval()


def model_from_full(ckpt: FullCheckpoint):
    """A one-process model holding `ckpt`'s weights (strict: every tensor must match by name and shape)."""
    model = build_model(ckpt.model_config())
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    check_state_matches(ckpt.state, {k: tuple(v.shape) for k, v in expected.items()}, ckpt.source)
    model.load_state_dict({**model.state_dict(), **ckpt.state}, strict=True)
    return model


def model_from_single_file(path, chunk_bytes: int = 1 << 28):
    """`model_from_full(read_single_file(path))` holding one copy of the weights: after the names and shapes are
    checked against the built model (strict, as `model_from_full`), the file's tensors are read about `chunk_bytes`
    at a time into it, so memory peaks at the model plus one chunk, not twice the model."""
    model = build_model(model_config_from_meta(read_meta(path), str(path)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with open_tensors(path) as f:
        names = [k for k in f.keys() if k != TOKENIZER_KEY]
        check_shapes_match({k: tuple(f.get_slice(k).get_shape()) for k in names}, expected, str(path))
        chunk, size = {}, 0
        for i, name in enumerate(names):
            chunk[name] = f.get_tensor(name)
            size += chunk[name].nbytes
            if size >= chunk_bytes or i == len(names) - 1:
                model.load_state_dict(chunk, strict=False)  # every name and shape was checked above
                chunk, size = {}, 0
    return model
