"""What the serving exporters read: a model as the reference implementation's tensors, config and tokenizer.

Three inputs give the same thing: a standalone export directory (`tools/checkpoint/export.py`: config.json,
model.safetensors, tokenizer.model), a trainer checkpoint of any layout (a step directory, its checkpoints root or
the run directory; an extracted sub-network from `tools/checkpoint/extract_task.py` is one), or a single
`.safetensors` file written by `tools/checkpoint/convert.py`. Checkpoints go through `checkpoint_tools/export.py`'s
renaming (the one place that maps megatron names to the reference's), so nothing here knows megatron's layout.
Reading a trainer checkpoint creates a one-process group (megatron-core's loader); an export directory does not.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
from megatron_taskmoe.reference import config as rc
from megatron_taskmoe.reference.model import ReferenceModel
from megatron_taskmoe.reference.translator import load


@dataclass(kw_only=True)
class ReferenceSource:
    """A model in the reference implementation's terms."""

    config: rc.ExportConfig
    """The model's config in the reference format."""
    state: dict[str, torch.Tensor]
    """fp32 tensors under the reference model's names."""
    tokenizer: bytes
    """The sentencepiece model the model was trained with."""
    where: str
    """The path it was read from (for messages)."""

    def model(self) -> ReferenceModel:
        """The reference model holding these weights (eval mode, CPU)."""
        model = ReferenceModel(self.config.model)
        model.load_state_dict(self.state, strict=True)
        return model.eval()

    def pieces(self) -> list[str]:
        """The tokenizer's pieces in id order (the model's real vocabulary, no padding rows)."""
        sp = spm.SentencePieceProcessor(model_proto=self.tokenizer)
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def is_export_dir(path: Path) -> bool:
    return path.is_dir() and (path / rc.CONFIG_FILE).is_file() and (path / rc.WEIGHTS_FILE).is_file()


def read_export_dir(path: Path) -> ReferenceSource:
    try:
        exported = load(path)
    except rc.ExportFormatError as e:
        raise CheckpointToolError(str(e)) from None
    state = {k: v.detach().float().contiguous() for k, v in exported.model.state_dict().items()}
    return ReferenceSource(config=exported.config, state=state,
                           tokenizer=(path / rc.TOKENIZER_FILE).read_bytes(), where=str(path))


def read_trainer(path: Path) -> ReferenceSource:
    # megatron-core only for a trainer checkpoint: serving an export needs torch alone
    from megatron_taskmoe.checkpoint_tools.export import (check_against_model, export_config, language_tags,
                                                          reference_state)
    from megatron_taskmoe.checkpoint_tools.reading import read_checkpoint

    ckpt = read_checkpoint(path)
    if ckpt.tokenizer is None:
        raise CheckpointToolError(f"{path}: the checkpoint carries no tokenizer (tokenizer.model beside "
                                  "checkpoint.json); serving needs it")
    sha = hashlib.sha256(ckpt.tokenizer).hexdigest()
    recorded = ckpt.meta.get("tokenizer_sha256")
    if recorded and recorded != sha:
        raise CheckpointToolError(f"{path}: the tokenizer's sha256 {sha[:12]}... differs from the one the model "
                                  f"was trained with ({recorded[:12]}...)")
    state = {k: v.detach().float().contiguous() for k, v in reference_state(ckpt).items()}
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / rc.TOKENIZER_FILE
        tok_path.write_bytes(ckpt.tokenizer)
        tags = language_tags(tok_path, list(ckpt.meta.get("languages", [])))
    config = export_config(ckpt, tags, "fp32", sha)
    check_against_model(state, config.model, str(path))
    return ReferenceSource(config=config, state=state, tokenizer=ckpt.tokenizer, where=str(path))


def read_source(path: str | os.PathLike) -> ReferenceSource:
    """An export directory, a trainer checkpoint or a convert.py .safetensors file (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointToolError(f"{path}: no such file or directory (expected an export directory, a trainer "
                                  "checkpoint or a .safetensors file written by convert.py)")
    return read_export_dir(path) if is_export_dir(path) else read_trainer(path)


__all__ = ["ReferenceSource", "is_export_dir", "read_export_dir", "read_trainer", "read_source"]
