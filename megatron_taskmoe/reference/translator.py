"""Loading an export directory and translating raw sentences with the reference model, without megatron-core.

`load(directory)` reads `config.json`, `model.safetensors` (strictly: every tensor named and shaped as the model
expects) and `tokenizer.model` (its sha256 must be the one recorded at export). `ReferenceTranslator.translate`
prepares sources exactly as `inference.Translator` (and the trainer's dataset) does: `<2tgt>` + pieces + eos,
truncated to the model's positions, batched in length order, decoded incrementally with the same beam search
(`generation.beam_search`, torch only; pad, bos, unk and the `<2xx>` tags banned), detokenized with sentencepiece.

Legend: B batch, S source length.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import sentencepiece as spm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from megatron_taskmoe.data.tokenizer import language_tag_ids
from megatron_taskmoe.generation import SearchConfig, beam_search
from megatron_taskmoe.reference.config import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, ExportConfig,
                                               ExportFormatError, read_config)
from megatron_taskmoe.reference.model import ReferenceDecoder, ReferenceModel

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Exported:
    """A loaded export: the model (eval mode), its config and the sentencepiece processor."""

    model: ReferenceModel
    """The reference model, in eval mode."""
    config: ExportConfig
    """The export's config.json."""
    tokenizer: object
    """sentencepiece.SentencePieceProcessor"""
    directory: Path
    """The export directory it was loaded from."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(model: ReferenceModel, path: Path, dtype: torch.dtype) -> None:
    """Strict load: a missing, unexpected or misshapen tensor is an error naming the file and the tensors."""
    if not path.is_file():
        raise ExportFormatError(f"{path}: no such file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ExportFormatError(f"{path}: not a readable safetensors file ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in sorted(set(state) & set(expected))
             if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ExportFormatError(f"{path}: the tensors do not fit {CONFIG_FILE}: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}, shape mismatches {wrong[:3]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)


def load(directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
         ) -> Exported:
    """An export directory -> `Exported`. Weights are cast to `dtype` (computation in fp32 by default, also for
    a bf16/fp16 export, whose weights are then exactly the stored ones)."""
    directory = Path(directory)
    config = read_config(directory)
    model = ReferenceModel(config.model)
    load_weights(model, directory / WEIGHTS_FILE, dtype)
    tok_path = directory / TOKENIZER_FILE
    if not tok_path.is_file():
        raise ExportFormatError(f"{tok_path}: no such file")
    if config.tokenizer_sha256 and _sha256(tok_path) != config.tokenizer_sha256:
        raise ExportFormatError(f"{tok_path}: sha256 differs from the one recorded in {CONFIG_FILE} "
                                f"({config.tokenizer_sha256[:12]}...)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(tok_path))
    except (OSError, RuntimeError) as e:
        raise ExportFormatError(f"{tok_path}: not a sentencepiece model ({e})") from None
    if sp.get_piece_size() != config.model.vocab_size:
        raise ExportFormatError(f"{tok_path}: {sp.get_piece_size()} pieces but the model has "
                                f"{config.model.vocab_size}")
    return Exported(model=model.to(device).eval(), config=config, tokenizer=sp, directory=directory)


class ReferenceTranslator:
    """Batched translation of raw sentences (same preparation, batching and search as `inference.Translator`)."""

    def __init__(self, exported: Exported, *, beam_size: int = 4, length_penalty: float = 1.0,
                 max_len_a: float = 1.2, max_len_b: int = 10, min_len: int = 0, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.exported = exported
        self.search = SearchConfig(beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
                                   max_len_b=max_len_b, min_len=min_len)
        special = exported.config.special_ids
        self.banned = sorted({special["pad"], special["bos"], special["unk"], *language_tag_ids(exported.tokenizer)})
        self.batch_size = batch_size
        arch = exported.config.model
        self.max_src_pieces = arch.max_source_positions - 2  # room for <2tgt> and eos, as the trainer truncates
        self.max_tgt_pieces = arch.max_target_positions - 1  # room for bos / eos
        self.device = next(exported.model.parameters()).device

    def sources(self, sentences: Sequence[str], src_lang: str, tgt_lang: str) -> tuple[list[list[int]], dict]:
        """Source token ids (`<2tgt>` + pieces + eos) and the direction's ids."""
        ids = self.exported.config.direction(src_lang, tgt_lang)
        eos = self.exported.config.special_ids["eos"]
        pieces = self.exported.tokenizer.encode(list(sentences), out_type=int)
        truncated = sum(len(p) > self.max_src_pieces for p in pieces)
        if truncated:
            log.warning("%d source sentence(s) longer than %d pieces truncated (the model's positions)", truncated,
                        self.max_src_pieces)
        return [[ids["tag_id"], *p[: self.max_src_pieces], eos] for p in pieces], ids

    @torch.no_grad()
    def translate_batch(self, src_rows: list[list[int]], ids: dict) -> list[list[int]]:
        """Best output ids (no bos/eos) for each source row."""
        special = self.exported.config.special_ids
        b, s = len(src_rows), max(len(r) for r in src_rows)
        src_BS = torch.full((b, s), special["pad"], dtype=torch.long)
        for i, row in enumerate(src_rows):
            src_BS[i, : len(row)] = torch.tensor(row)
        lengths = [len(r) for r in src_rows]
        padding_BS = torch.arange(s)[None, :] >= torch.tensor(lengths)[:, None]
        dev = self.device
        enc = self.exported.model.encode(src_BS.to(dev), padding_BS.to(dev),
                                         task_ids=torch.full((b,), ids["task_id"], dtype=torch.long, device=dev),
                                         tgt_lang_ids=torch.full((b,), ids["tgt_lang_id"], dtype=torch.long,
                                                                 device=dev))
        decoder = ReferenceDecoder(self.exported.model, enc, self.search.beam_size)
        return beam_search(decoder, batch_size=b, bos=special["bos"], eos=special["eos"],
                           max_lengths=self.search.max_lengths(lengths, self.max_tgt_pieces),
                           beam_size=self.search.beam_size, length_penalty=self.search.length_penalty,
                           min_length=self.search.min_len, banned=self.banned, device=dev)

    def translate_ids(self, sentences: Sequence[str], src_lang: str, tgt_lang: str) -> list[list[int]]:
        rows, ids = self.sources(sentences, src_lang, tgt_lang)
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        out: list[Optional[list[int]]] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for pos, hyp in zip(chunk, self.translate_batch([rows[i] for i in chunk], ids)):
                out[pos] = hyp
        return out

    def translate(self, sentences: Sequence[str], src_lang: str, tgt_lang: str) -> list[str]:
        """Detokenized translations of `sentences`, in their order."""
        return [self.exported.tokenizer.decode(ids) for ids in self.translate_ids(sentences, src_lang, tgt_lang)]


def translate(directory: str | Path, sentences: Sequence[str], src_lang: str, tgt_lang: str, **options) -> list[str]:
    """One-call convenience: load an export directory and translate `sentences` (options as ReferenceTranslator)."""
    return ReferenceTranslator(load(directory), **options).translate(sentences, src_lang, tgt_lang)
