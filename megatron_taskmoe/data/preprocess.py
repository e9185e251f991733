"""Bitext -> megatron-core indexed datasets, one tokenization pass per bitext for both translation directions.

Why it is built this way (the goal is sentencepiece's own speed, see benchmarks/preprocess.py):
  * the main process reads and validates every input first (nothing is written for bad input), then cuts the
    bitexts into chunks of a few thousand pairs; worker processes batch-encode both sides of a chunk with one
    `sp.encode(list)` call each, apply the filters, and return flat token arrays (uint16 when the vocabulary allows,
    so the pickles are small); the main process only appends bytes to `IndexedDatasetBuilder`s, in input order;
  * a source and a target file are written once per bitext; the reverse direction's files are hard links to them
    (xx-en's `.xx` is en-xx's `.xx`), so both directions come from one pass and cost no extra disk;
  * everything is written under `OUT/.tmp-preprocess-*` and moved into place when complete; `manifest.json` is
    written last, atomically. An error leaves no `.bin/.idx` behind.
Sequences hold sentence pieces only: the `<2xx>` tag, bos and eos are added when batches are built, so one file
serves both directions.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_taskmoe.data.bitext import Bitext, DataError, discover_bitexts, languages_of, read_bitext
from megatron_taskmoe.data.manifest import FORMAT_VERSION, MANIFEST_NAME, build_task_map, write_json_atomic
from megatron_taskmoe.data.tokenizer import Tokenizer

FILTERS = ("empty", "too_long", "ratio")


@dataclass(kw_only=True)
class PreprocessConfig:
    """Options of tools/preprocess_data.py."""

    input_dir: Path
    tokenizer: Path
    output_dir: Path
    workers: int = 1
    max_len: int = 256  # pieces per side (tag/bos/eos not counted); 0 disables the filter
    max_ratio: float = 3.0  # longer side / shorter side in pieces; 0 disables the filter
    splits: tuple[str, ...] | None = None  # None: every split found
    both_directions: bool = True  # xx-yy files also give yy-xx
    task_map: str = "direction"  # a mode of manifest.TASK_MAP_MODES or a groups file
    chunk_pairs: int = 4096
    extra_language_codes: tuple[str, ...] = ()
    progress: bool = True

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
            raise DataError("chunk_pairs must be >= 1")


@dataclass(kw_only=True)
class SideStats:
    sentences: int = 0
    tokens: int = 0
    max_len: int = 0


@dataclass(kw_only=True)
class BitextResult:
    bitext: Bitext
    lines: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    src: SideStats = field(default_factory=SideStats)
    tgt: SideStats = field(default_factory=SideStats)


# ---- worker side ---------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(model_path: str, dtype_name: str, max_len: int, max_ratio: float) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(model_path)
    _WORKER.update(sp=sp, dtype=np.dtype(dtype_name), max_len=max_len, max_ratio=max_ratio)


def _flatten(ids: list[list[int]], keep: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    kept = [ids[i] for i in np.flatnonzero(keep)]
    lengths = np.fromiter(map(len, kept), dtype=np.int32, count=len(kept))
    tokens = np.fromiter(itertools.chain.from_iterable(kept), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


def filter_mask(src_empty, src_len, tgt_empty, tgt_len, max_len: int, max_ratio: float) -> dict[str, np.ndarray]:
    """Boolean masks of removed pairs per filter; a pair counts under the first filter that removes it."""
    empty = np.asarray(src_empty) | np.asarray(tgt_empty)
    too_long = ~empty & ((src_len > max_len) | (tgt_len > max_len)) if max_len else np.zeros_like(empty)
    longer, shorter = np.maximum(src_len, tgt_len), np.maximum(np.minimum(src_len, tgt_len), 1)
    ratio = ~empty & ~too_long & (longer > max_ratio * shorter) if max_ratio else np.zeros_like(empty)
    return {"empty": empty, "too_long": too_long, "ratio": ratio}


def encode_chunk(task: tuple[int, list[str], list[str]]):
    """(bitext index, source lines, target lines) -> flat kept tokens and lengths of both sides, removal counts."""
    index, src_lines, tgt_lines = task
    sp = _WORKER["sp"]
    src_ids = sp.encode(src_lines, out_type=int, num_threads=1)
    tgt_ids = sp.encode(tgt_lines, out_type=int, num_threads=1)
    src_len = np.fromiter(map(len, src_ids), dtype=np.int64, count=len(src_ids))
    tgt_len = np.fromiter(map(len, tgt_ids), dtype=np.int64, count=len(tgt_ids))
    masks = filter_mask([not s.strip() for s in src_lines], src_len, [not t.strip() for t in tgt_lines], tgt_len,
                        _WORKER["max_len"], _WORKER["max_ratio"])
    keep = ~(masks["empty"] | masks["too_long"] | masks["ratio"])
    src = _flatten(src_ids, keep, _WORKER["dtype"])
    tgt = _flatten(tgt_ids, keep, _WORKER["dtype"])
    return index, len(src_lines), src, tgt, {k: int(v.sum()) for k, v in masks.items()}


# ---- main side -----------------------------------------------------------------------------------------------------
def _dtype_for(vocab_size: int):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron.core warns about missing Apex/TE on import
        from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def direction_files(split: str, src: str, tgt: str) -> tuple[str, str]:
    """Path prefixes (relative to OUT) of the source and target datasets of direction src->tgt."""
    return f"{split}.{src}-{tgt}.{src}", f"{split}.{src}-{tgt}.{tgt}"


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Preprocess everything; returns the manifest (also written to OUT/manifest.json)."""
    start = time.time()
    bitexts = discover_bitexts(cfg.input_dir, set(cfg.splits) if cfg.splits else None, cfg.extra_language_codes)
    tokenizer = Tokenizer(cfg.tokenizer)
    languages = languages_of(bitexts)
    tag_ids = tokenizer.check_languages(languages)

    directions: dict[str, list[tuple[Bitext, bool]]] = {}  # direction -> [(bitext, reversed)]
    for b in bitexts:
        directions.setdefault(f"{b.src}-{b.tgt}", []).append((b, False))
        if cfg.both_directions:
            directions.setdefault(f"{b.tgt}-{b.src}", []).append((b, True))
    task_map = build_task_map(list(directions), cfg.task_map)

    texts = {}
    for i, b in enumerate(tqdm(bitexts, desc="reading", unit="file", disable=not cfg.progress)):
        texts[i] = read_bitext(b)
    tasks = [(i, src[j: j + cfg.chunk_pairs], tgt[j: j + cfg.chunk_pairs])
             for i, (src, tgt) in texts.items() for j in range(0, len(src), cfg.chunk_pairs)]
    total_pairs = sum(len(src) for src, _ in texts.values())
    del texts
    dtype = _dtype_for(tokenizer.vocab_size)  # imports megatron.core (seconds): only once the input is known good
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.output_dir / f".tmp-preprocess-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    results = {i: BitextResult(bitext=b) for i, b in enumerate(bitexts)}
    remaining = {i: 0 for i in results}
    for i, _, _ in tasks:
        remaining[i] += 1
    pool = None
    try:
        builders = {}
        init_args = (str(tokenizer.path), np.dtype(dtype).name, cfg.max_len, cfg.max_ratio)
        if cfg.workers == 1:
            _init_worker(*init_args)
            chunk_results = map(encode_chunk, tasks)
        else:
            pool = mp.get_context("fork" if os.name == "posix" else "spawn").Pool(
                cfg.workers, initializer=_init_worker, initargs=init_args)
            chunk_results = pool.imap(encode_chunk, tasks)
        with tqdm(total=total_pairs, desc="encoding", unit="pairs", unit_scale=True, disable=not cfg.progress) as bar:
            for i, n, src, tgt, removed in chunk_results:
                r = results[i]
                b = r.bitext
                if i not in builders:
                    prefixes = direction_files(b.split, b.src, b.tgt)
                    builders[i] = [IndexedDatasetBuilder(str(tmp / f"{p}.bin"), dtype=dtype) for p in prefixes]
                for builder, (tokens, lengths), side in zip(builders[i], (src, tgt), (r.src, r.tgt)):
                    if len(lengths):
                        builder.add_document(tokens, lengths.tolist())
                        side.max_len = max(side.max_len, int(lengths.max()))
                    side.sentences += len(lengths)
                    side.tokens += int(lengths.sum())
                r.lines += n
                for k, v in removed.items():
                    r.removed[k] += v
                remaining[i] -= 1
                if remaining[i] == 0:
                    _finalize(builders.pop(i), tmp, b)
                bar.update(n)
        if pool is not None:
            pool.close()
            pool.join()
        for i, r in results.items():  # bitexts with no lines at all
            if r.lines == 0:
                b = r.bitext
                empty = [IndexedDatasetBuilder(str(tmp / f"{p}.bin"), dtype=dtype)
                         for p in direction_files(b.split, b.src, b.tgt)]
                _finalize(empty, tmp, b)
        for i, r in results.items():
            b = r.bitext
            if cfg.both_directions:
                for fwd, bwd in zip(direction_files(b.split, b.src, b.tgt), direction_files(b.split, b.tgt, b.src)[::-1]):
                    for ext in (".bin", ".idx"):
                        _link_or_copy(tmp / f"{fwd}{ext}", tmp / f"{bwd}{ext}")
        for path in sorted(tmp.iterdir()):
            os.replace(path, cfg.output_dir / path.name)
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)

    manifest = _manifest(cfg, tokenizer, languages, tag_ids, dtype, directions, task_map, results,
                         time.time() - start)
    write_json_atomic(cfg.output_dir / MANIFEST_NAME, manifest)
    return manifest


def _finalize(builders, tmp: Path, b: Bitext) -> None:
    """Close the builders' .bin files and write their .idx in megatron-core's format.

    `IndexedDatasetBuilder.finalize` computes the byte offsets in a Python loop (seconds per million sentences, in
    the serial part of the pipeline); the same `_IndexWriter` with a vectorized `_sequence_pointers` writes the
    identical file. One document per sentence, as an NMT reader expects.
    """
    from megatron.core.datasets.indexed_dataset import DType, _IndexWriter

    class _VectorizedIndexWriter(_IndexWriter):
        def _sequence_pointers(self, sequence_lengths):
            lengths = np.asarray(sequence_lengths, dtype=np.int64)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1] * DType.size(self.dtype), out=pointers[1:])
            return pointers

    for builder, prefix in zip(builders, direction_files(b.split, b.src, b.tgt)):
        builder.data_file.close()
        lengths = np.asarray(builder.sequence_lengths, dtype=np.int32)
        with _VectorizedIndexWriter(str(tmp / f"{prefix}.idx"), builder.dtype) as writer:
            writer.write(lengths, None, np.arange(len(lengths) + 1, dtype=np.int64))


def _manifest(cfg, tokenizer, languages, tag_ids, dtype, directions, task_map, results, seconds) -> dict:
    by_bitext = {r.bitext: r for r in results.values()}
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
            "removed": {r.bitext.name: dict(r.removed) for r in results.values()},
        },
        "inputs": {r.bitext.name: {"files": [str(p) for p in r.bitext.paths], "format": r.bitext.kind,
                                   "lines": r.lines, "kept": r.src.sentences} for r in results.values()},
        "both_directions": cfg.both_directions,
        "seconds": round(seconds, 2),
    }
