"""The joint sentencepiece tokenizer: fixed special ids and one `<2xx>` tag per language.

Fixed ids (the whole project relies on them): pad=0, unk=1, bos=2, eos=3. Every language code `xx` of the corpus is a
user-defined symbol `<2xx>`, prepended to the source to tell the model which language to produce.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megatron_taskmoe.data.bitext import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def lang_tag(lang: str) -> str:
    return f"<2{lang}>"


_TAG = re.compile(r"<2[^<>\s]+>")


def language_tag_ids(sp: spm.SentencePieceProcessor) -> list[int]:
    """Ids of every `<2xx>` tag piece of a sentencepiece model (what a translation must never contain)."""
    return [i for i in range(sp.get_piece_size()) if _TAG.fullmatch(sp.id_to_piece(i))]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temperature_probabilities(sizes, temperature: float) -> np.ndarray:
    """p_i proportional to n_i^(1/T): T=1 proportional to size, large T close to uniform."""
    sizes_N = np.asarray(sizes, dtype=np.float64)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if sizes_N.ndim != 1 or len(sizes_N) == 0 or np.any(sizes_N < 0) or sizes_N.sum() <= 0:
        raise ValueError(f"sizes must be non-negative with a positive sum, got {sizes}")
    # log-space keeps huge sizes with T close to 0 finite
    logits_N = np.where(sizes_N > 0, np.log(np.maximum(sizes_N, 1e-300)) / temperature, -np.inf)
    weights_N = np.exp(logits_N - logits_N.max())
    return weights_N / weights_N.sum()


class Tokenizer:
    """sentencepiece with the project's special ids checked at load time."""

    def __init__(self, model_path: str | Path, *, model_proto: bytes | None = None):
        """The sentencepiece model at `model_path`; or, given `model_proto` (a model's bytes, e.g. the copy inside a
        single-file checkpoint), that model, with `model_path` naming where the bytes came from in messages."""
        self.path = Path(model_path)
        self.model_proto = model_proto
        """The model's bytes when it was given as bytes (None when it was read from `path`)."""
        if model_proto is None and not self.path.is_file():
            raise DataError(f"{self.path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            if model_proto is None:
                self.sp.Load(str(self.path))
            else:
                self.sp.LoadFromSerializedProto(model_proto)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.path}: not a sentencepiece model ({e})") from None
        got = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise DataError(f"{self.path}: special ids (pad, unk, bos, eos) are {got}, expected (0, 1, 2, 3); "
                            "train it with tools/train_tokenizer.py")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def lang_tag_id(self, lang: str) -> int:
        tag = lang_tag(lang)
        piece_id = self.sp.piece_to_id(tag)
        if piece_id == UNK_ID or self.sp.id_to_piece(piece_id) != tag:
            raise DataError(f"{self.path}: tokenizer has no language tag {tag} (retrain it with this language)")
        return piece_id

    def check_languages(self, languages) -> dict[str, int]:
        missing = []
        for lang in languages:
            try:
                self.lang_tag_id(lang)
            except DataError:
                missing.append(lang_tag(lang))
        if missing:
            raise DataError(f"{self.path}: tokenizer lacks the language tag(s) {' '.join(missing)} needed by the "
                            "data (retrain it with tools/train_tokenizer.py over all languages)")
        return {lang: self.lang_tag_id(lang) for lang in languages}

    def encode(self, sentences: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(sentences, out_type=int, num_threads=num_threads)

    def encode_flat(self, sentences: list) -> tuple[np.ndarray, np.ndarray]:
        """(pieces of all `sentences` back to back, pieces per sentence), both int32; see `encode_flat`."""
        return encode_flat(self.sp, sentences)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def sha256(self) -> str:
        return file_sha256(self.path) if self.model_proto is None else hashlib.sha256(self.model_proto).hexdigest()

    def model_bytes(self) -> bytes:
        """The sentencepiece model's bytes (what a checkpoint carries)."""
        return self.path.read_bytes() if self.model_proto is None else self.model_proto

    def banned_ids(self) -> list[int]:
        """Ids a translation never contains: pad, bos, unk and every `<2xx>` tag."""
        return sorted({PAD_ID, BOS_ID, UNK_ID, *language_tag_ids(self.sp)})


def _encode_buffers(sp: spm.SentencePieceProcessor, sentences: list) -> list:
    """sentencepiece's batch encoder, returning its raw per-sentence int32 buffers (what `encode(out_type="numpy")`
    wraps one numpy array at a time), with one thread: callers run several in threads, as the encoding itself
    releases the GIL. Not public API: `_raw_buffers_work` checks it before use."""
    return sp._processor._EncodeAsBufferBatch(sentences, 1, None, False, -1, 0.0, False, False, False)


def _raw_buffers_work(sp: spm.SentencePieceProcessor) -> bool:
    """Whether this sentencepiece has the raw batch encoder with the signature `_encode_buffers` uses (checked by
    its result on three sentences)."""
    probe = ["a b", "", "Ab c"]
    try:
        got = [list(memoryview(b)) for b in _encode_buffers(sp, probe)]
    except (AttributeError, TypeError):
        return False
    return got == sp.encode(probe, out_type=int)


_RAW_BUFFERS: list[bool] = []  # the check's result, once per process (it depends on the library, not the model)
_SEPARATOR = np.array([-1], dtype=np.int32).tobytes()  # never a piece id


def encode_flat(sp: spm.SentencePieceProcessor, sentences: list, *,
                raw_buffers: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode `sentences` (str, or UTF-8 bytes: sentencepiece takes either) into (tokens_T, lengths_N), int32: the
    pieces of all sentences back to back and the number of pieces of each; equal to `sp.encode(sentences)`
    flattened. The raw path (`raw_buffers`, default: when it works) joins sentencepiece's buffers with a -1
    between sentences in one copy and finds the boundaries with numpy: no Python object per piece or sentence
    besides sentencepiece's own; the public path makes one numpy array per sentence."""
    if raw_buffers is None:
        if not _RAW_BUFFERS:
            _RAW_BUFFERS.append(_raw_buffers_work(sp))
        raw_buffers = _RAW_BUFFERS[0]
    if not sentences:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
    if raw_buffers:
        joined = np.frombuffer(_SEPARATOR.join(_encode_buffers(sp, sentences)), dtype=np.int32)
        is_piece = joined >= 0
        separators = np.flatnonzero(~is_piece)
        bounds = np.concatenate([[-1], separators, [len(joined)]])
        lengths_N = (np.diff(bounds) - 1).astype(np.int32)
        tokens_T = joined[is_piece] if len(separators) else joined
    else:
        arrays = sp.encode(sentences, out_type="numpy", num_threads=1)
        lengths_N = np.fromiter(map(len, arrays), dtype=np.int32, count=len(arrays))
        tokens_T = np.concatenate(arrays).astype(np.int32, copy=False)
    return tokens_T, lengths_N


def sample_corpus(sentences_by_lang: dict[str, list[str]], total: int, temperature: float,
                  seed: int) -> dict[str, list[str]]:
    """Draw `total` training sentences over languages with p_L ~ n_L^(1/T), so that small languages get pieces.

    A language asked for more sentences than it has repeats whole passes over them (in a seeded order) before the
    remainder, so that every sentence is seen before any is seen twice.
    """
    langs = sorted(sentences_by_lang)
    sizes = [len(sentences_by_lang[lang]) for lang in langs]
    probs = temperature_probabilities(sizes, temperature)
    quotas = np.floor(probs * total).astype(np.int64)
    quotas[np.argsort(-probs, kind="stable")[: total - int(quotas.sum())]] += 1  # largest remainders first
    rng = np.random.default_rng(seed)
    out = {}
    for lang, n, quota in zip(langs, sizes, quotas):
        if n == 0:
            out[lang] = []
            continue
        order = np.concatenate([rng.permutation(n) for _ in range(-(-int(quota) // n))])[:quota]
        sents = sentences_by_lang[lang]
        out[lang] = [sents[i] for i in order]
    return out


def train_sentencepiece(*, corpus_file: Path, model_prefix: Path, vocab_size: int, model_type: str,
                        languages, character_coverage: float, seed: int, num_threads: int) -> None:
    """Train with the project's fixed special ids and `<2xx>` tags; deterministic for a given corpus and seed."""
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=[lang_tag(lang) for lang in sorted(languages)],
        input_sentence_size=0,  # we sampled already; sentencepiece's own sampling would undo the temperature
        shuffle_input_sentence=False,
        num_threads=num_threads,
        max_sentence_length=8192,
        hard_vocab_limit=False,  # a tiny corpus gets a smaller vocabulary instead of an error
        minloglevel=2,
    )
