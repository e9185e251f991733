"""Bitext -> megatron-core indexed datasets, one tokenization pass per bitext for both translation directions.

How it is built (the goal is sentencepiece's own speed as a whole process; see benchmarks/preprocess.py):
  * one process, no torch or megatron-core import: `indexed.py` writes megatron-core's .bin/.idx format itself
    (byte-identical, tested), which keeps start-up to a fraction of a second;
  * the main thread reads and checks every input first (UTF-8, line counts, fields, blank sides: nothing is encoded
    for bad input), keeping aligned and TSV text as UTF-8 bytes, the form sentencepiece encodes;
  * `workers` threads encode chunks of a few thousand pairs with sentencepiece's batch encoder, which releases
    the GIL while it encodes, take its output as flat int32 buffers (no Python int per piece), apply the filters
    with numpy and narrow the tokens to the file dtype; the main thread writes the chunks in input order, one
    `write` per chunk and side, while the threads encode the next ones;
  * a source and a target file are written once per bitext; the reverse direction's files are hard links to them
    (xx-en's `.xx` is en-xx's `.xx`), so both directions come from one pass and cost no extra disk;
  * for every split but `train`, each direction also gets its raw target text, one line per kept pair in dataset
    order (`{split}.{src}-{tgt}.ref.{tgt}`, newlines inside a sentence replaced by spaces): the references that
    validation scores against, instead of decoded (and possibly truncated) pieces;
  * everything is written under `OUT/.tmp-preprocess-*` and moved into place only when every check has passed:
    the old `manifest.json` is removed first and the new one is moved in last, so OUT never holds a manifest that
    disagrees with its files. A bitext whose pairs the filters remove entirely is an error (nothing is written).
Sequences hold sentence pieces only: the `<2xx>` tag, bos and eos are added when batches are built, so one file
serves both directions.

Legend: N sentences (pairs) of a chunk, T tokens of a chunk's side.
"""

from __future__ import annotations

import collections
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_taskmoe.data.bitext import Bitext, DataError, discover_bitexts, languages_of, read_bitext_raw
from megatron_taskmoe.data.indexed import IndexedDatasetWriter, optimal_dtype
from megatron_taskmoe.data.manifest import FORMAT_VERSION, MANIFEST_NAME, build_task_map, write_json_atomic
from megatron_taskmoe.data.tokenizer import Tokenizer, encode_flat

FILTERS = ("empty", "too_long", "ratio")
TRAIN_SPLIT = "train"


@dataclass(kw_only=True)
class PreprocessConfig:
    """Options of tools/preprocess_data.py."""

    input_dir: Path
    """Directory of bitext files (see bitext.py for the accepted names and formats)."""
    tokenizer: Path
    """sentencepiece model written by tools/train_tokenizer.py."""
    output_dir: Path
    """Where the .bin/.idx files and manifest.json go (created if missing)."""
    workers: int = 1
    """Encoding threads."""
    max_len: int = 256
    """Pieces per side (tag/bos/eos not counted) above which a pair is removed; 0 disables the filter."""
    max_ratio: float = 3.0
    """Longer side / shorter side in pieces above which a pair is removed; 0 disables the filter."""
    splits: tuple[str, ...] | None = None
    """Only these splits; None: every split found (then a `train` split is required)."""
    both_directions: bool = True
    """xx-yy files also give yy-xx."""
    task_map: str = "direction"
    """A mode of manifest.TASK_MAP_MODES or a groups file."""
    chunk_pairs: int = 4096
    """Pairs per encoding work item."""
    warn_removed: float = 0.1
    """Warn about a bitext that loses more than this share of its pairs to the filters."""
    extra_language_codes: tuple[str, ...] = ()
    """Language codes accepted besides ISO 639-1."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        self.input_dir, self.tokenizer, self.output_dir = Path(self.input_dir), Path(self.tokenizer), Path(
            self.output_dir)
        if self.workers < 1:
            raise DataError(f"--workers must be >= 1, got {self.workers}")
        if self.max_len < 0 or self.max_ratio < 0:
            raise DataError("--max-len and --max-ratio must be >= 0 (0 disables the filter)")
        if self.max_ratio and self.max_ratio < 1:
            raise DataError(f"--max-ratio must be >= 1 (or 0 to disable), got {self.max_ratio}")
        if self.chunk_pairs < 1:
            raise DataError("--chunk-pairs must be >= 1")
        if not 0 <= self.warn_removed <= 1:
            raise DataError(f"--warn-removed must lie in [0, 1], got {self.warn_removed}")


@dataclass(kw_only=True)
class SideStats:
    sentences: int = 0
    """Kept sentences of this side."""
    tokens: int = 0
    """Pieces in the kept sentences."""
    max_len: int = 0
    """Pieces in the longest kept sentence."""


@dataclass(kw_only=True)
class BitextResult:
    bitext: Bitext
    """The bitext these counts are for."""
    lines: int = 0
    """Sentence pairs read from the bitext."""
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    """Filter name (preprocess.FILTERS) -> pairs it removed."""
    src: SideStats = field(default_factory=SideStats)
    """Statistics of the kept source sentences."""
    tgt: SideStats = field(default_factory=SideStats)
    """Statistics of the kept target sentences."""


@dataclass(kw_only=True)
class EncodedChunk:
    """Kept pairs of one chunk, both sides as flat tokens in the file dtype, and the filters' removal counts."""

    src_tokens_T: np.ndarray
    """Source piece ids of the kept pairs, concatenated."""
    src_lengths_N: np.ndarray
    """Source length in pieces of each kept pair."""
    tgt_tokens_T: np.ndarray
    """Target piece ids of the kept pairs, concatenated."""
    tgt_lengths_N: np.ndarray
    """Target length in pieces of each kept pair."""
    removed: dict[str, int]
    """Filter name -> pairs of the chunk it removed."""
    lines: int
    """Pairs in the chunk before filtering."""
    keep_N: np.ndarray
    """Which of the chunk's pairs were kept."""


def filter_mask(src_len, tgt_len, max_len: int, max_ratio: float) -> dict[str, np.ndarray]:
    """Boolean masks of removed pairs per filter, from the pieces per side; a pair counts under the first filter
    that removes it. `empty`: a side without pieces (blank, or only characters the tokenizer drops)."""
    src_len, tgt_len = np.asarray(src_len), np.asarray(tgt_len)
    empty = (src_len == 0) | (tgt_len == 0)
    too_long = ~empty & ((src_len > max_len) | (tgt_len > max_len)) if max_len else np.zeros_like(empty)
    longer, shorter = np.maximum(src_len, tgt_len), np.maximum(np.minimum(src_len, tgt_len), 1)
    ratio = ~empty & ~too_long & (longer > max_ratio * shorter) if max_ratio else np.zeros_like(empty)
    return {"empty": empty, "too_long": too_long, "ratio": ratio}


def encode_pairs(tokenizer: Tokenizer, src: list, tgt: list, *, max_len: int, max_ratio: float,
                 dtype) -> EncodedChunk:
    """Encode aligned sentences (str or UTF-8 bytes), filter the pairs, return the kept ones (thread-safe). Both
    sides go to sentencepiece in one call (each call hands the work to a thread of its own and back)."""
    tokens_T, len_N = tokenizer.encode_flat(src + tgt)
    src_len_N, tgt_len_N = len_N[: len(src)], len_N[len(src):]
    src_count = int(src_len_N.sum(dtype=np.int64))
    src_tokens_T, tgt_tokens_T = tokens_T[:src_count], tokens_T[src_count:]
    masks = filter_mask(src_len_N, tgt_len_N, max_len, max_ratio)
    keep_N = ~(masks["empty"] | masks["too_long"] | masks["ratio"])
    if not keep_N.all():
        src_tokens_T = src_tokens_T[np.repeat(keep_N, src_len_N)]
        tgt_tokens_T = tgt_tokens_T[np.repeat(keep_N, tgt_len_N)]
        src_len_N, tgt_len_N = src_len_N[keep_N], tgt_len_N[keep_N]
    return EncodedChunk(src_tokens_T=src_tokens_T.astype(dtype), src_lengths_N=src_len_N,
                        tgt_tokens_T=tgt_tokens_T.astype(dtype), tgt_lengths_N=tgt_len_N,
                        removed={k: int(v.sum()) for k, v in masks.items()}, lines=len(src), keep_N=keep_N)


def direction_files(split: str, src: str, tgt: str) -> tuple[str, str]:
    """Path prefixes (relative to OUT) of the source and target datasets of direction src->tgt."""
    return f"{split}.{src}-{tgt}.{src}", f"{split}.{src}-{tgt}.{tgt}"


def reference_file(split: str, src: str, tgt: str) -> str:
    """File name (relative to OUT) of the raw target text of direction src->tgt."""
    return f"{split}.{src}-{tgt}.ref.{tgt}"


def _reference_lines(lines: list) -> bytes:
    """Sentences (UTF-8 bytes, or str from JSONL) as UTF-8 text of one line each: line breaks inside a sentence
    (only JSONL strings can hold a newline; any input a carriage return) become spaces."""
    if lines and isinstance(lines[0], str):
        lines = [line.replace("\r\n", " ").replace("\n", " ").encode("utf-8") for line in lines]
    text = b"".join(line + b"\n" for line in lines)
    return text.replace(b"\r", b" ") if b"\r" in text else text


def _files(b: Bitext) -> str:
    return ", ".join(str(p) for p in b.paths)


def _counts(removed: dict[str, int]) -> str:
    return ", ".join(f"{k} {removed[k]}" for k in FILTERS)


def _read_inputs(bitexts: list[Bitext], progress: bool) -> list[tuple[list, list]]:
    """Read and check every bitext; a bitext without lines or with a blank side is an error here already."""
    texts = []
    for b in tqdm(bitexts, desc="reading", unit="file", disable=not progress):
        src, tgt = read_bitext_raw(b)
        if not src:
            raise DataError(f"{_files(b)}: no lines: {b.name} has no pairs")
        for side, lang in ((src, b.src), (tgt, b.tgt)):
            if not any(s.strip() for s in side):
                raise DataError(f"{_files(b)}: every {lang} side of the {len(side)} pairs of {b.name} is blank: the "
                                f"'empty' filter would remove all of them (empty {len(side)}, too_long 0, ratio 0): "
                                "nothing was written")
        texts.append((src, tgt))
    return texts


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Preprocess everything; returns the manifest (also written to OUT/manifest.json)."""
    start = time.time()
    bitexts = discover_bitexts(cfg.input_dir, set(cfg.splits) if cfg.splits else None, cfg.extra_language_codes)
    if (cfg.splits is None or TRAIN_SPLIT in cfg.splits) and not any(b.split == TRAIN_SPLIT for b in bitexts):
        found = sorted({b.split for b in bitexts})
        raise DataError(f"{cfg.input_dir}: no training pairs: no {TRAIN_SPLIT}.* bitext files (splits found: "
                        f"{', '.join(found)}; to preprocess only those, pass --splits {' '.join(found)})")
    tokenizer = Tokenizer(cfg.tokenizer)
    languages = languages_of(bitexts)
    tag_ids = tokenizer.check_languages(languages)
    directions: dict[str, list[tuple[Bitext, bool]]] = {}  # direction -> [(bitext, reversed)]
    for b in bitexts:
        directions.setdefault(f"{b.src}-{b.tgt}", []).append((b, False))
        if cfg.both_directions:
            directions.setdefault(f"{b.tgt}-{b.src}", []).append((b, True))
    task_map = build_task_map(list(directions), cfg.task_map)
    dtype = optimal_dtype(tokenizer.vocab_size)
    texts = _read_inputs(bitexts, cfg.progress)
    encode_flat(tokenizer.sp, ["a"])  # picks the encoder path once, before the threads start

    created = not cfg.output_dir.exists()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.output_dir / f".tmp-preprocess-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    results = [BitextResult(bitext=b) for b in bitexts]
    writers: dict[int, tuple[list, list]] = {}  # bitext -> (its two dataset writers, its reference files)
    committed = False
    try:
        _encode_all(cfg, tokenizer, dtype, texts, results, writers, tmp)
        del texts
        emptied = [r for r in results if r.src.sentences == 0]
        if emptied:
            raise DataError("; ".join(
                f"{_files(r.bitext)}: the filters removed all {r.lines} pairs of {r.bitext.name} "
                f"({_counts(r.removed)}; --max-len {cfg.max_len}, --max-ratio {cfg.max_ratio})" for r in emptied)
                + ": nothing was written")
        for r in results:
            b = r.bitext
            if cfg.both_directions:
                for fwd, bwd in zip(direction_files(b.split, b.src, b.tgt),
                                    direction_files(b.split, b.tgt, b.src)[::-1]):
                    for ext in (".bin", ".idx"):
                        _link_or_copy(tmp / f"{fwd}{ext}", tmp / f"{bwd}{ext}")
        manifest = _manifest(cfg, tokenizer, languages, tag_ids, dtype, directions, task_map, results,
                             time.time() - start)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        # commit: no manifest while the data files are replaced, the new one last
        (cfg.output_dir / MANIFEST_NAME).unlink(missing_ok=True)
        for path in sorted(tmp.iterdir()):
            if path.name != MANIFEST_NAME:
                os.replace(path, cfg.output_dir / path.name)
        os.replace(tmp / MANIFEST_NAME, cfg.output_dir / MANIFEST_NAME)
        committed = True
    finally:
        for datasets, references in writers.values():
            for w in datasets:
                w.close()
            for f, _ in references:
                f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not committed:
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return manifest


def _encode_all(cfg: PreprocessConfig, tokenizer: Tokenizer, dtype, texts, results: list[BitextResult],
                writers: dict, tmp: Path) -> None:
    """Encode every bitext in chunks on `cfg.workers` threads; write the chunks in input order."""
    chunks = [(i, j) for i, (src, _) in enumerate(texts) for j in range(0, len(src), cfg.chunk_pairs)]
    last_chunk = {i: j for i, j in chunks}
    in_flight = 2 * cfg.workers + 1  # enough queued work to keep every thread busy while the main thread writes
    pending: collections.deque = collections.deque()
    total = sum(len(src) for src, _ in texts)
    with tqdm(total=total, desc="encoding", unit="pairs", unit_scale=True, disable=not cfg.progress) as bar, \
            ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="encode") as pool:
        try:
            for i, j in chunks:
                src, tgt = texts[i]
                pending.append((i, j, pool.submit(encode_pairs, tokenizer, src[j: j + cfg.chunk_pairs],
                                                  tgt[j: j + cfg.chunk_pairs], max_len=cfg.max_len,
                                                  max_ratio=cfg.max_ratio, dtype=dtype)))
                while len(pending) > in_flight:
                    _write_chunk(*pending.popleft(), texts, cfg, results, writers, last_chunk, dtype, tmp, bar)
            while pending:
                _write_chunk(*pending.popleft(), texts, cfg, results, writers, last_chunk, dtype, tmp, bar)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _write_chunk(i: int, j: int, future, texts, cfg: PreprocessConfig, results: list[BitextResult], writers: dict,
                 last_chunk: dict, dtype, tmp: Path, bar) -> None:
    chunk: EncodedChunk = future.result()
    r = results[i]
    b = r.bitext
    if i not in writers:
        datasets = [IndexedDatasetWriter(tmp / p, dtype) for p in direction_files(b.split, b.src, b.tgt)]
        references = []  # (file, side of the bitext holding its text)
        if b.split != TRAIN_SPLIT:
            references.append((open(tmp / reference_file(b.split, b.src, b.tgt), "wb"), 1))
            if cfg.both_directions:
                references.append((open(tmp / reference_file(b.split, b.tgt, b.src), "wb"), 0))
        writers[i] = (datasets, references)
    datasets, references = writers[i]
    for writer, tokens_T, lengths_N, side in ((datasets[0], chunk.src_tokens_T, chunk.src_lengths_N, r.src),
                                             (datasets[1], chunk.tgt_tokens_T, chunk.tgt_lengths_N, r.tgt)):
        writer.add(tokens_T, lengths_N)
        side.sentences += len(lengths_N)
        side.tokens += int(lengths_N.sum(dtype=np.int64))
        if len(lengths_N):
            side.max_len = max(side.max_len, int(lengths_N.max()))
    for f, side in references:
        lines = texts[i][side][j: j + cfg.chunk_pairs]
        f.write(_reference_lines([lines[k] for k in np.flatnonzero(chunk.keep_N)]))
    r.lines += chunk.lines
    for k, v in chunk.removed.items():
        r.removed[k] += v
    if last_chunk[i] == j:
        for writer in datasets:
            writer.finalize()
        for f, _ in references:
            f.close()
        del writers[i]
    bar.update(chunk.lines)


def removal_warnings(manifest: dict, share: float) -> list[str]:
    """One line per bitext that lost more than `share` of its pairs to the filters, with the counts."""
    lines = []
    for name, info in manifest["inputs"].items():
        removed = manifest["filters"]["removed"][name]
        lost = info["lines"] - info["kept"]
        if info["lines"] and lost / info["lines"] > share:
            lines.append(f"{', '.join(info['files'])}: the filters removed {lost} of the {info['lines']} pairs of "
                         f"{name} ({100 * lost / info['lines']:.1f}%, more than {100 * share:g}%: "
                         f"{_counts(removed)}; --max-len {manifest['filters']['max_len']}, --max-ratio "
                         f"{manifest['filters']['max_ratio']})")
    return lines


def _manifest(cfg, tokenizer, languages, tag_ids, dtype, directions, task_map, results, seconds) -> dict:
    by_bitext = {r.bitext: r for r in results}
    dir_entries = {}
    for direction in sorted(directions):
        src_lang, tgt_lang = direction.split("-")
        splits = {}
        for b, is_reversed in directions[direction]:
            r = by_bitext[b]
            src_side, tgt_side = (r.tgt, r.src) if is_reversed else (r.src, r.tgt)
            src_prefix, tgt_prefix = direction_files(b.split, src_lang, tgt_lang)
            splits[b.split] = {
                "src_prefix": src_prefix, "tgt_prefix": tgt_prefix, "sentences": src_side.sentences,
                "src_tokens": src_side.tokens, "tgt_tokens": tgt_side.tokens,
                "max_src_len": src_side.max_len, "max_tgt_len": tgt_side.max_len,
                "from_bitext": b.name,
            }
            if b.split != TRAIN_SPLIT:
                splits[b.split]["references"] = reference_file(b.split, src_lang, tgt_lang)
        dir_entries[direction] = {"src": src_lang, "tgt": tgt_lang,
                                  "task_id": task_map["direction_to_task"][direction], "splits": splits}
    return {
        "format_version": FORMAT_VERSION,
        "languages": languages,
        "language_ids": {lang: i for i, lang in enumerate(languages)},
        "tokenizer": {"path": str(tokenizer.path.resolve()), "sha256": tokenizer.sha256(),
                      "vocab_size": tokenizer.vocab_size, "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
                      "lang_tag_ids": tag_ids},
        "dtype": np.dtype(dtype).name,
        "task_map": task_map,
        "directions": dir_entries,
        "filters": {
            "max_len": cfg.max_len, "max_ratio": cfg.max_ratio, "order": list(FILTERS),
            "removed": {r.bitext.name: dict(r.removed) for r in results},
            "warn_removed": cfg.warn_removed,
        },
        "inputs": {r.bitext.name: {"files": [str(p) for p in r.bitext.paths], "format": r.bitext.kind,
                                   "lines": r.lines, "kept": r.src.sentences} for r in results},
        "both_directions": cfg.both_directions,
        "seconds": round(seconds, 2),
    }
