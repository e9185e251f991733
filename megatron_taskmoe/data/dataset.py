"""The multilingual translation dataset over preprocessed directions, read through megatron-core's IndexedDataset.

Legend: N sentences over all chosen directions (flat index), D directions.

Files hold sentence pieces only; a sample is assembled when read:
  src    = <2tgt> + source pieces + eos      (the target-language tag tells the model what to produce)
  tgt_in = bos + target pieces               (decoder input)
  labels = target pieces + eos               (decoder input shifted by one)
Everything is memory-mapped; start-up reads only the index arrays (sequence lengths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_taskmoe.data.bitext import DataError
from megatron_taskmoe.data.indexed import check_indexed_dataset
from megatron_taskmoe.data.manifest import load_manifest
from megatron_taskmoe.data.tokenizer import BOS_ID, EOS_ID


class MultilingualDataset:
    """Flat-indexed sentence pairs of one split over several directions (index i: direction d = direction_of(i))."""

    def __init__(self, data_dir: str | Path, split: str, directions=None, max_src_len: int | None = None,
                 max_tgt_len: int | None = None):
        # imported here, inside the silenced block: megatron-core warns about missing Apex/TE on import
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # megatron.core warns about missing Apex/TE on import
            from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        available = [d for d, e in sorted(self.manifest["directions"].items()) if split in e["splits"]]
        if not available:
            raise DataError(f"{self.data_dir}: no direction has a {split!r} split")
        if directions is None:
            directions = available
        unknown = [d for d in directions if d not in available]
        if unknown:
            raise DataError(f"{self.data_dir}: direction(s) {' '.join(unknown)} have no {split!r} split "
                            f"(available: {' '.join(available)})")
        empty = [d for d in directions if self.manifest["directions"][d]["splits"][split]["sentences"] <= 0]
        if empty:
            raise DataError(f"{self.data_dir}: direction(s) {' '.join(empty)} have no {split!r} sentences (all their "
                            "pairs were filtered out; re-run tools/preprocess_data.py, which refuses such data)")
        self.split = split
        self.directions = list(directions)
        self.language_ids = self.manifest["language_ids"]
        tag_ids = self.manifest["tokenizer"]["lang_tag_ids"]
        self.max_src_len, self.max_tgt_len = max_src_len, max_tgt_len  # pieces kept per side (truncation)

        self._src, self._tgt = [], []
        sizes, task, src_lang, tgt_lang, tags = [], [], [], [], []
        for d in self.directions:
            entry = self.manifest["directions"][d]
            info = entry["splits"][split]
            for prefix, tokens in ((info["src_prefix"], info["src_tokens"]), (info["tgt_prefix"], info["tgt_tokens"])):
                check_indexed_dataset(self.data_dir / prefix, sentences=info["sentences"], tokens=tokens)
            self._src.append(IndexedDataset(str(self.data_dir / info["src_prefix"])))
            self._tgt.append(IndexedDataset(str(self.data_dir / info["tgt_prefix"])))
            sizes.append(len(self._src[-1]))
            task.append(entry["task_id"])
            src_lang.append(self.language_ids[entry["src"]])
            tgt_lang.append(self.language_ids[entry["tgt"]])
            tags.append(tag_ids[entry["tgt"]])
        self.sizes_D = np.asarray(sizes, dtype=np.int64)
        self.offsets_D = np.concatenate([[0], np.cumsum(self.sizes_D)])
        self.task_ids_D, self.tags_D = np.asarray(task), np.asarray(tags)
        self.src_lang_ids_D, self.tgt_lang_ids_D = np.asarray(src_lang), np.asarray(tgt_lang)

        src_pieces_N = np.concatenate([ds.sequence_lengths for ds in self._src]).astype(np.int64)
        tgt_pieces_N = np.concatenate([ds.sequence_lengths for ds in self._tgt]).astype(np.int64)
        if max_src_len is not None:
            src_pieces_N = np.minimum(src_pieces_N, max_src_len)
        if max_tgt_len is not None:
            tgt_pieces_N = np.minimum(tgt_pieces_N, max_tgt_len)
        self.src_lengths_N = src_pieces_N + 2  # tag + eos
        self.tgt_lengths_N = tgt_pieces_N + 1  # bos (tgt_in) or eos (labels)
        self.task_ids_N = np.repeat(self.task_ids_D, self.sizes_D)

    @property
    def num_tasks(self) -> int:
        return len(self.manifest["task_map"]["tasks"])

    def __len__(self) -> int:
        return int(self.offsets_D[-1])

    def direction_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets_D, index, side="right") - 1)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sentences")
        d = self.direction_of(index)
        local = int(index - self.offsets_D[d])
        src = np.asarray(self._src[d][local], dtype=np.int64)[: self.max_src_len]
        tgt = np.asarray(self._tgt[d][local], dtype=np.int64)[: self.max_tgt_len]
        return {
            "src": np.concatenate([[self.tags_D[d]], src, [EOS_ID]]),
            "tgt_in": np.concatenate([[BOS_ID], tgt]),
            "labels": np.concatenate([tgt, [EOS_ID]]),
            "task_id": int(self.task_ids_D[d]),
            "src_lang_id": int(self.src_lang_ids_D[d]),
            "tgt_lang_id": int(self.tgt_lang_ids_D[d]),
            "index": index,
        }
