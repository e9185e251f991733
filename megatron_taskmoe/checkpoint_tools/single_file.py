"""A whole model in one safetensors file: the tensors, the checkpoint record as JSON in the header and the
tokenizer as a byte tensor. No parallel layout: any trainer layout can be written from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError, FullCheckpoint
from megatron_taskmoe.checkpoint_tools.outputs import check_output
from megatron_taskmoe.fileio import write_atomic

FORMAT = "megatron-taskmoe/full-v1"
"""The header's `format`."""
TOKENIZER_KEY = "__tokenizer_model__"
"""The tensor holding the tokenizer's bytes (uint8)."""
SINGLE_FILE_SUFFIX = ".safetensors"


def is_single_file(path: str | os.PathLike) -> bool:
    """Whether `path` names a single-file checkpoint (by its suffix; whether it is one, reading tells)."""
    return Path(path).suffix == SINGLE_FILE_SUFFIX


def read_meta(path: str | os.PathLike) -> dict:
    """The checkpoint record of a file written by `write_single_file`, from its header alone (the tensors are not
    read); CheckpointToolError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointToolError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointToolError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointToolError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r} "
                                  "(written by tools/checkpoint/convert.py --single-file)")
    return json.loads(header["meta"])


def read_single_file(path: str | os.PathLike) -> FullCheckpoint:
    """A file written by `write_single_file`; CheckpointToolError naming the file otherwise."""
    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointToolError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    token = tensors.pop(TOKENIZER_KEY, None)
    tokenizer = bytes(token.numpy().tobytes()) if token is not None else None
    return FullCheckpoint(state=tensors, meta=meta, tokenizer=tokenizer, source=str(path))


def write_single_file(ckpt: FullCheckpoint, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """One safetensors file: the tensors, the record as JSON in the header, the tokenizer as a byte tensor."""
    path = check_output(path, overwrite)
    tensors = {k: v.detach().contiguous().clone() for k, v in ckpt.state.items()}
    if ckpt.tokenizer is not None:
        tensors[TOKENIZER_KEY] = torch.frombuffer(bytearray(ckpt.tokenizer), dtype=torch.uint8).clone()
    metadata = {"format": FORMAT, "meta": json.dumps(ckpt.meta, sort_keys=True)}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), suffix=".tmp")
