"""Our .bin/.idx writer against megatron-core's IndexedDatasetBuilder (byte for byte) and IndexedDataset (reads
them back), and the header/size checks the readers run before opening a data directory."""

import warnings

import numpy as np
import pytest
import torch

from megatron_taskmoe.data.bitext import DataError
from megatron_taskmoe.data.indexed import (DTYPE_CODES, IndexedDatasetWriter, check_indexed_dataset,
                                           optimal_dtype)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder


def _sentences(rng, n, vocab):
    lengths = rng.integers(0, 40, size=n)  # zero-length sequences included
    return [rng.integers(0, vocab, size=k) for k in lengths]


@pytest.mark.parametrize("vocab", [8000, 70000])
def test_bytes_equal_megatron_core_builder(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    sentences = _sentences(rng, 1000, vocab)
    dtype = DType.optimal_dtype(vocab)
    assert optimal_dtype(vocab) == np.dtype(dtype)

    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for s in sentences:
        builder.add_item(torch.from_numpy(s.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))

    writer = IndexedDatasetWriter(tmp_path / "ours", optimal_dtype(vocab))
    cuts = [0, 1, 17, 400, 999, 1000]  # uneven chunks, two of them a single sentence
    for start, stop in zip(cuts[:-1], cuts[1:]):
        chunk = sentences[start:stop]
        writer.add(np.concatenate(chunk).astype(np.int32), np.array([len(s) for s in chunk]))
    writer.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext

    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(sentences)
    for i in (0, 1, 500, 999):
        np.testing.assert_array_equal(ds[i], sentences[i])
    info = check_indexed_dataset(tmp_path / "ours", sentences=1000, tokens=sum(map(len, sentences)))
    assert info == {"dtype": np.dtype(dtype).name, "sentences": 1000, "documents": 1001}


def test_dtype_codes_are_megatron_cores():
    assert DTYPE_CODES == {d.name: d.value for d in DType}


def test_empty_dataset_matches_builder(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    builder.finalize(str(tmp_path / "ref.idx"))
    writer = IndexedDatasetWriter(tmp_path / "ours", np.uint16)
    writer.finalize()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


def test_checks_name_the_broken_file(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "a", np.uint16)
    writer.add(np.arange(10), np.array([4, 6]))
    writer.finalize()
    check_indexed_dataset(tmp_path / "a", sentences=2, tokens=10)
    with pytest.raises(DataError, match=r"a\.idx: 2 sequences, but manifest.json says 3"):
        check_indexed_dataset(tmp_path / "a", sentences=3)
    with pytest.raises(DataError, match=r"a\.bin: 20 bytes, expected 22 for the 11 tokens"):
        check_indexed_dataset(tmp_path / "a", tokens=11)
    idx = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(idx[:-3])
    with pytest.raises(DataError, match=r"a\.idx: .* bytes, expected .* for 2 sequences \(truncated or corrupt\)"):
        check_indexed_dataset(tmp_path / "a")
    (tmp_path / "a.idx").write_bytes(b"not an index")
    with pytest.raises(DataError, match="not a megatron-core index file"):
        check_indexed_dataset(tmp_path / "a")
    (tmp_path / "a.bin").unlink()
    with pytest.raises(DataError, match=r"a\.bin: missing"):
        check_indexed_dataset(tmp_path / "a")
