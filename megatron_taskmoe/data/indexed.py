"""megatron-core's indexed dataset files (`PREFIX.bin` + `PREFIX.idx`), written and checked without importing
megatron-core (whose import pulls in torch and takes seconds, most of a small preprocessing run).

The files are byte-identical to what `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` writes when
every sentence is added as its own document (`add_item` + `end_document`), and they are read with megatron-core's
`IndexedDataset` (both tested in tests/unit/test_indexed_format.py). Format (little-endian, version 1):

  .bin   the tokens of all sequences back to back, in the index's dtype
  .idx   b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code | u64 sequence count N | u64 document count M
         | int32[N] sequence lengths | int64[N] byte offsets of the sequences in .bin | int64[M] document indices
         (here M = N + 1 and the document indices are 0..N: one document per sentence)

Legend: N sequences (sentences), T tokens in all.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from megatron_taskmoe.data.bitext import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_FIXED_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, sequence and document counts
# megatron.core.datasets.indexed_dataset.DType: numpy dtype name <-> code stored in the .idx
DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}


def optimal_dtype(vocab_size: int) -> np.dtype:
    """megatron-core's `DType.optimal_dtype`: uint16 below 65500 symbols, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class IndexedDatasetWriter:
    """Append sentences (flat tokens + lengths, in order) to `PREFIX.bin`; `finalize` writes `PREFIX.idx`.

    Tokens are written as they arrive (one `write` per call, no per-sentence Python work); only the lengths are kept
    in memory until `finalize`.
    """

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no code in megatron-core's indexed format")
        self._bin = open(f"{self.prefix}.bin", "wb")
        self._lengths: list[np.ndarray] = []

    def add(self, tokens_T: np.ndarray, lengths_N: np.ndarray) -> None:
        """Append N sentences: `tokens_T` holds their tokens back to back, `lengths_N` their lengths."""
        tokens_T = np.ascontiguousarray(tokens_T, dtype=self.dtype)
        self._bin.write(memoryview(tokens_T).cast("B"))
        self._lengths.append(np.asarray(lengths_N, dtype=np.int32))

    def finalize(self) -> np.ndarray:
        """Close the .bin, write the .idx; returns the sequence lengths."""
        self._bin.close()
        lengths_N = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        write_index(f"{self.prefix}.idx", lengths_N, self.dtype)
        return lengths_N

    def close(self) -> None:
        """Close the .bin without writing an index (on errors)."""
        self._bin.close()


def write_index(path: str | os.PathLike, lengths_N: np.ndarray, dtype) -> None:
    """Write the .idx of sequences with lengths `lengths_N`, one document per sequence."""
    dtype = np.dtype(dtype)
    lengths_N = np.asarray(lengths_N, dtype=np.int32)
    n = len(lengths_N)
    pointers_N = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths_N[:-1].astype(np.int64) * dtype.itemsize, out=pointers_N[1:])
    with open(path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<QBQQ", INDEX_VERSION, DTYPE_CODES[dtype.name], n, n + 1))
        f.write(lengths_N.tobytes())
        f.write(pointers_N.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())


def check_indexed_dataset(prefix: str | os.PathLike, *, sentences: int | None = None,
                          tokens: int | None = None) -> dict:
    """Check that `PREFIX.idx/.bin` exist and agree with each other (and with the expected counts, when given)
    from the index header and the file sizes alone; raises DataError naming the file. Returns
    {"dtype", "sentences", "documents"}."""
    idx, binf = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, binf):
        if not path.is_file():
            raise DataError(f"{path}: missing (the data directory is incomplete; re-run tools/preprocess_data.py)")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_FIXED_BYTES)
    if len(head) < _FIXED_BYTES or not head.startswith(INDEX_HEADER):
        raise DataError(f"{idx}: not a megatron-core index file (bad header)")
    version, code, n, m = struct.unpack("<QBQQ", head[len(INDEX_HEADER):])
    names = {c: name for name, c in DTYPE_CODES.items()}
    if version != INDEX_VERSION or code not in names:
        raise DataError(f"{idx}: unsupported index version {version} or dtype code {code}")
    if size != _FIXED_BYTES + 12 * n + 8 * m:
        raise DataError(f"{idx}: {size} bytes, expected {_FIXED_BYTES + 12 * n + 8 * m} for {n} sequences "
                        "(truncated or corrupt)")
    if sentences is not None and n != sentences:
        raise DataError(f"{idx}: {n} sequences, but manifest.json says {sentences}")
    dtype = np.dtype(names[code])
    if tokens is not None and binf.stat().st_size != tokens * dtype.itemsize:
        raise DataError(f"{binf}: {binf.stat().st_size} bytes, expected {tokens * dtype.itemsize} for the "
                        f"{tokens} tokens manifest.json records (truncated or corrupt)")
    return {"dtype": dtype.name, "sentences": n, "documents": m}
