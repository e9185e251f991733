"""A whole model in one safetensors file: the tensors, the checkpoint record as JSON in the header and the
tokenizer as a byte tensor. No parallel layout: any trainer layout can be written from it."""

from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    with open_tensors(path) as f:
        header = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise CheckpointToolError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r} "
                                  "(written by tools/checkpoint/convert.py --single-file)")
    return json.loads(header["meta"])


def read_single_file(path: str | os.PathLike) -> FullCheckpoint:
    """A file written by `write_single_file`; CheckpointToolError naming the file otherwise."""
    path = Path(path)
    meta = read_meta(path)
    with open_tensors(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    token = tensors.pop(TOKENIZER_KEY, None)
    tokenizer = bytes(token.numpy().tobytes()) if token is not None else None
    return FullCheckpoint(state=tensors, meta=meta, tokenizer=tokenizer, source=str(path))


def read_tokenizer(path: str | os.PathLike) -> bytes | None:
    """The tokenizer a file written by `write_single_file` carries (None if none), without reading its weights."""
    with open_tensors(path) as f:
        return bytes(f.get_tensor(TOKENIZER_KEY).numpy().tobytes()) if TOKENIZER_KEY in f.keys() else None


@contextmanager
def open_tensors(path: str | os.PathLike):
    """`safe_open` on a file, its errors as CheckpointToolError naming the file: `with open_tensors(p) as f:`
    `f.metadata()`, `f.keys()`, `f.get_slice(k).get_shape()`, `f.get_tensor(k)` (one tensor at a time)."""
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointToolError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    with f:
        yield f


def _writable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors can write them: each one that alone holds its whole storage as is (no copy: a
    model's own parameters), the others (views, tied or shared storage) copied into storage of their own."""
    users = Counter(v.untyped_storage().data_ptr() for v in tensors.values())
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        whole = (v.is_contiguous() and v.storage_offset() == 0 and v.numel() > 0
                 and v.untyped_storage().nbytes() == v.numel() * v.element_size())
        out[k] = v if whole and users[v.untyped_storage().data_ptr()] == 1 else v.contiguous().clone()
    return out


def write_single_file(ckpt: FullCheckpoint, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """One safetensors file: the tensors, the record as JSON in the header, the tokenizer as a byte tensor. The
    tensors are written from where they are (`_writable`), so writing a model needs no second copy of it."""
    path = check_output(path, overwrite)
    tensors = _writable(ckpt.state)
    if ckpt.tokenizer is not None:
        tensors[TOKENIZER_KEY] = torch.frombuffer(bytearray(ckpt.tokenizer), dtype=torch.uint8).clone()
    metadata = {"format": FORMAT, "meta": json.dumps(ckpt.meta, sort_keys=True)}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), suffix=".tmp")
