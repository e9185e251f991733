"""The fast paths of preprocessing give what the plain ones give: flat encoding vs `sp.encode`, byte lines vs
decoded lines, and the filters' semantics on piece counts."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import train_tokenizer  # noqa: E402

from megatron_taskmoe.data.bitext import DataError, decode_lines, split_lines  # noqa: E402
from megatron_taskmoe.data.preprocess import encode_pairs, filter_mask  # noqa: E402
from megatron_taskmoe.data.tokenizer import Tokenizer, encode_flat  # noqa: E402

EN = [f"the house number {i} is small and red, said Zoë" for i in range(30)]
DE = [f"das Haus Nummer {i} ist klein und rot, sagte Zoë — schön" for i in range(30)]
SENTENCES = ["", "   ", "Im Anfang schuf Gott", "naïve café — 東京", "\u200b", "a" * 300, "x\ty", "Ölberg."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "train.de-en.de").write_text("".join(s + "\n" for s in DE), encoding="utf-8")
    (corpus / "train.de-en.en").write_text("".join(s + "\n" for s in EN), encoding="utf-8")
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    assert train_tokenizer.main(["--input-dir", str(corpus), "--output-prefix", str(prefix), "--vocab-size", "90",
                                 "--sentences", "500", "--threads", "1"]) == 0
    return Tokenizer(f"{prefix}.model")


@pytest.mark.parametrize("raw_buffers", [True, False])
@pytest.mark.parametrize("as_bytes", [True, False])
def test_encode_flat_equals_encode(tokenizer, raw_buffers, as_bytes):
    sentences = [s.encode() if as_bytes else s for s in SENTENCES + DE]
    tokens_T, lengths_N = encode_flat(tokenizer.sp, sentences, raw_buffers=raw_buffers)
    expected = tokenizer.sp.encode(SENTENCES + DE, out_type=int)
    assert tokens_T.dtype == np.int32 and lengths_N.dtype == np.int32
    assert lengths_N.tolist() == [len(e) for e in expected]
    assert tokens_T.tolist() == [t for e in expected for t in e]
    empty_T, empty_N = encode_flat(tokenizer.sp, [], raw_buffers=raw_buffers)
    assert len(empty_T) == len(empty_N) == 0


def test_raw_buffer_path_is_available(tokenizer):
    """The sentencepiece the project requires has the raw batch encoder (else encoding takes the slower path)."""
    from megatron_taskmoe.data import tokenizer as tokenizer_module

    assert tokenizer_module._raw_buffers_work(tokenizer.sp)


@pytest.mark.parametrize("data", [
    "a\nb\n".encode(), "a\nb".encode(), "\ufeffa\r\nb\r\n".encode(), "".encode(), "\n\n".encode(),
    "x\u2028y\nz\rw\n".encode(), "Zoë\t東京\n".encode(),
])
def test_split_lines_equals_decode_lines(data):
    assert [line.decode() for line in split_lines(data, "f")] == decode_lines(data, "f")


def test_split_lines_reports_invalid_utf8_like_decode_lines():
    data = "ok\nstill ok\n".encode() + b"caf\xe9\n"
    for reader in (split_lines, decode_lines):
        with pytest.raises(DataError, match=r"^f:3: invalid UTF-8"):
            reader(data, "f")


def test_filters_count_each_pair_once():
    src = np.array([0, 5, 300, 2, 10, 0])
    tgt = np.array([4, 0, 3, 9, 12, 0])
    masks = filter_mask(src, tgt, max_len=256, max_ratio=3)
    assert masks["empty"].tolist() == [True, True, False, False, False, True]
    assert masks["too_long"].tolist() == [False, False, True, False, False, False]
    assert masks["ratio"].tolist() == [False, False, False, True, False, False]
    off = filter_mask(src, tgt, max_len=0, max_ratio=0)
    assert not off["too_long"].any() and not off["ratio"].any()


def test_encode_pairs_keeps_the_unfiltered_pairs_in_order(tokenizer):
    src = [s.encode() for s in EN[:6]] + [b"   ", b"ok"]
    tgt = [s.encode() for s in DE[:6]] + [b"Haus", b"a " * 120]
    chunk = encode_pairs(tokenizer, src, tgt, max_len=100, max_ratio=3, dtype=np.uint16)
    assert chunk.removed == {"empty": 1, "too_long": 1, "ratio": 0} and chunk.lines == 8
    expected_src = tokenizer.sp.encode(EN[:6])
    expected_tgt = tokenizer.sp.encode(DE[:6])
    assert chunk.src_lengths_N.tolist() == [len(e) for e in expected_src]
    assert chunk.src_tokens_T.dtype == np.uint16
    assert chunk.src_tokens_T.tolist() == [t for e in expected_src for t in e]
    assert chunk.tgt_tokens_T.tolist() == [t for e in expected_tgt for t in e]
