"""Finding and reading parallel text: fairseq-style aligned files, TSV and JSONL.

Accepted file names inside an input directory (`split` is any word, e.g. train/valid/test):
  * `{split}.{src}-{tgt}.{src}` and `{split}.{src}-{tgt}.{tgt}`: one sentence per line, aligned by line number;
  * `{split}.{src}-{tgt}.tsv`: `source<TAB>target` per line;
  * `{split}.{src}-{tgt}.jsonl`: `{"src": ..., "tgt": ...}` per line.
Input errors raise `DataError` with the file (and line) named, so command-line tools can print one clear line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# ISO 639-1 codes: a language code outside this list (and outside `extra_codes`) is almost always a typo.
ISO_639_1 = frozenset(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee el "
    "en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu "
    "ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na "
    "nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so "
    "sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu".split()
)

_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)\.(?P<src>[^.\-]+)-(?P<tgt>[^.\-]+)\.(?P<ext>[^.]+)$")


class DataError(Exception):
    """Bad input data or options: the message names the file, line or option at fault."""


@dataclass(frozen=True, kw_only=True)
class Bitext:
    """One parallel corpus file set: a split of a language pair, in one of the accepted formats."""

    split: str
    """Split name ("train", "valid", "test", ...)."""
    src: str
    """Source language code."""
    tgt: str
    """Target language code."""
    kind: str
    """File format: "aligned", "tsv" or "jsonl"."""
    paths: tuple[Path, ...]
    """aligned: (src file, tgt file); tsv/jsonl: (file,)"""

    @property
    def pair(self) -> str:
        return f"{self.src}-{self.tgt}"

    @property
    def name(self) -> str:
        return f"{self.split}.{self.pair}"


def check_language(code: str, where: str, extra_codes=()) -> None:
    if code not in ISO_639_1 and code not in extra_codes:
        raise DataError(f"{where}: unknown language code {code!r} (not ISO 639-1; allow it with "
                        f"--extra-language-codes {code})")


def discover_bitexts(input_dir: Path, splits=None, extra_codes=()) -> list[Bitext]:
    """All bitexts in `input_dir` (sorted by split and pair); files not matching the naming scheme are ignored."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: input directory does not exist")
    aligned: dict[tuple[str, str, str], dict[str, Path]] = {}
    found: list[Bitext] = []
    for path in sorted(input_dir.iterdir()):
        m = _NAME.match(path.name)
        if not m or not path.is_file() or (splits is not None and m["split"] not in splits):
            continue
        split, src, tgt, ext = m["split"], m["src"], m["tgt"], m["ext"]
        if ext in ("tsv", "jsonl"):
            for code in (src, tgt):
                check_language(code, str(path), extra_codes)
            found.append(Bitext(split=split, src=src, tgt=tgt, kind=ext, paths=(path,)))
        elif ext in (src, tgt):
            for code in (src, tgt):
                check_language(code, str(path), extra_codes)
            aligned.setdefault((split, src, tgt), {})[ext] = path
    for (split, src, tgt), sides in sorted(aligned.items()):
        for side in (src, tgt):
            if side not in sides:
                other = next(iter(sides.values()))
                missing = input_dir / f"{split}.{src}-{tgt}.{side}"
                raise DataError(f"{missing}: missing file (its other side {other} exists)")
        found.append(Bitext(split=split, src=src, tgt=tgt, kind="aligned", paths=(sides[src], sides[tgt])))
    seen: dict[tuple[str, frozenset], Bitext] = {}
    for b in found:
        key = (b.split, frozenset((b.src, b.tgt)))
        if b.src == b.tgt:
            raise DataError(f"{b.paths[0]}: source and target language are both {b.src!r}")
        if key in seen:
            raise DataError(f"{b.paths[0]}: the pair {b.src}/{b.tgt} of split {b.split!r} is also given by "
                            f"{seen[key].paths[0]}")
        seen[key] = b
    if not found:
        raise DataError(f"{input_dir}: no bitext files found (expected names like train.de-en.de + train.de-en.en, "
                        "train.de-en.tsv or train.de-en.jsonl)")
    return sorted(found, key=lambda b: (b.split, b.pair))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


def decode_lines(data: bytes, name: str) -> list[str]:
    """UTF-8 lines without their line ends (a final newline is optional); bad bytes are reported as `name:line`."""
    text = _decode(data, name)
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")  # not splitlines(): U+2028 and friends are text, not line breaks
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def split_lines(data: bytes, name: str) -> list[bytes]:
    """`decode_lines` without decoding: the same lines, as UTF-8 bytes (checked to be valid UTF-8)."""
    if not data.isascii():
        _decode(data, name)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")  # a newline byte never occurs inside a multi-byte UTF-8 character
    if lines and lines[-1] == b"":
        lines.pop()
    if b"\r" in data:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    return lines


def _check_aligned(bitext: Bitext, src, tgt) -> None:
    if len(src) != len(tgt):
        raise DataError(f"{bitext.paths[0]} has {len(src)} lines but {bitext.paths[1]} has {len(tgt)}: "
                        "aligned files must have the same number of lines")


def _split_tsv(path: Path, lines, tab):
    src, tgt = [], []
    for number, line in enumerate(lines, start=1):
        fields = line.split(tab)
        if len(fields) != 2:
            raise DataError(f"{path}:{number}: expected 2 tab-separated fields, found {len(fields)}")
        src.append(fields[0])
        tgt.append(fields[1])
    return src, tgt


def _parse_jsonl(path: Path, lines: list[str]) -> tuple[list[str], list[str]]:
    src, tgt = [], []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            fields = [record["src"], record["tgt"]]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise DataError(f"{path}:{number}: expected a JSON object with string fields 'src' and 'tgt' "
                            f"({type(e).__name__}: {e})") from None
        if not all(isinstance(f, str) for f in fields):
            raise DataError(f"{path}:{number}: 'src' and 'tgt' must be strings")
        src.append(fields[0])
        tgt.append(fields[1])
    return src, tgt


def read_bitext(bitext: Bitext) -> tuple[list[str], list[str]]:
    """(source sentences, target sentences), aligned by index."""
    if bitext.kind == "aligned":
        src, tgt = (decode_lines(_read_bytes(p), str(p)) for p in bitext.paths)
        _check_aligned(bitext, src, tgt)
        return src, tgt
    path = bitext.paths[0]
    lines = decode_lines(_read_bytes(path), str(path))
    return _split_tsv(path, lines, "\t") if bitext.kind == "tsv" else _parse_jsonl(path, lines)


def read_bitext_raw(bitext: Bitext) -> tuple[list, list]:
    """`read_bitext` for the encoder: the same sentences, with the same checks, as UTF-8 `bytes` (aligned and TSV
    files: no decoding, which sentencepiece would undo) or `str` (JSONL). sentencepiece encodes either."""
    if bitext.kind == "aligned":
        src, tgt = (split_lines(_read_bytes(p), str(p)) for p in bitext.paths)
        _check_aligned(bitext, src, tgt)
        return src, tgt
    path = bitext.paths[0]
    if bitext.kind == "tsv":
        return _split_tsv(path, split_lines(_read_bytes(path), str(path)), b"\t")
    return _parse_jsonl(path, decode_lines(_read_bytes(path), str(path)))


def languages_of(bitexts) -> list[str]:
    """Sorted language list: a language's id is its index here."""
    return sorted({code for b in bitexts for code in (b.src, b.tgt)})
