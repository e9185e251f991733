"""Bad input to the command-line tools: one clear line on stderr, a non-zero exit, nothing half-written."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import train_tokenizer  # noqa: E402


def run_tool(script, *args):
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stderr


def write_pair(root: Path, split, src, tgt, src_lines, tgt_lines):
    (root / f"{split}.{src}-{tgt}.{src}").write_text("".join(s + "\n" for s in src_lines), encoding="utf-8")
    (root / f"{split}.{src}-{tgt}.{tgt}").write_text("".join(s + "\n" for s in tgt_lines), encoding="utf-8")


GOOD_EN = [f"the house number {i} is small and red" for i in range(40)]
GOOD_DE = [f"das haus nummer {i} ist klein und rot" for i in range(40)]


@pytest.fixture(scope="module")
def spm_de_en(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    write_pair(corpus, "train", "de", "en", GOOD_DE, GOOD_EN)
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    assert train_tokenizer.main(["--input-dir", str(corpus), "--output-prefix", str(prefix), "--vocab-size", "80",
                                 "--sentences", "500", "--threads", "1"]) == 0
    return Path(f"{prefix}.model")


def _bad_line_counts(d):
    write_pair(d, "train", "de", "en", GOOD_DE, GOOD_EN[:-1])
    return "has 40 lines but"


def _invalid_utf8(d):
    write_pair(d, "train", "de", "en", GOOD_DE, GOOD_EN)
    path = d / "train.de-en.en"
    lines = path.read_bytes().split(b"\n")
    lines[6] = b"caf\xe9 au lait"
    path.write_bytes(b"\n".join(lines))
    return "train.de-en.en:7: invalid UTF-8"


def _unknown_language(d):
    write_pair(d, "train", "de", "en", GOOD_DE, GOOD_EN)
    write_pair(d, "train", "qq", "en", GOOD_DE, GOOD_EN)
    return "unknown language code 'qq'"


def _missing_file(d):
    write_pair(d, "train", "de", "en", GOOD_DE, GOOD_EN)
    (d / "valid.de-en.de").write_text("x\n", encoding="utf-8")
    return "valid.de-en.en: missing file"


def _missing_tag(d):
    write_pair(d, "train", "de", "en", GOOD_DE, GOOD_EN)
    write_pair(d, "train", "fr", "en", GOOD_DE, GOOD_EN)
    return "lacks the language tag(s) <2fr>"


def _bad_tsv(d):
    write_pair(d, "train", "de", "en", GOOD_DE, GOOD_EN)
    (d / "valid.de-en.tsv").write_text("a\tb\nno tab here\n", encoding="utf-8")
    return "valid.de-en.tsv:2: expected 2 tab-separated fields"


def _bad_jsonl(d):
    write_pair(d, "train", "de", "en", GOOD_DE, GOOD_EN)
    (d / "valid.de-en.jsonl").write_text('{"src": "a", "tgt": "b"}\n{"src": "a"}\n', encoding="utf-8")
    return "valid.de-en.jsonl:2: expected a JSON object"


@pytest.mark.parametrize("make_input", [_bad_line_counts, _invalid_utf8, _unknown_language, _missing_file,
                                        _missing_tag, _bad_tsv, _bad_jsonl])
def test_preprocess_bad_input(make_input, spm_de_en, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    expected = make_input(inp)
    rc, stderr = run_tool("tools/preprocess_data.py", "--input-dir", inp, "--tokenizer", spm_de_en, "--output-dir",
                          out, "--workers", "2", "--no-progress")
    assert rc != 0
    assert expected in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    leftovers = list(out.rglob("*")) if out.exists() else []
    assert not [p for p in leftovers if p.suffix in (".bin", ".idx", ".json") or p.name.startswith(".tmp")]


def test_preprocess_bad_tokenizer_and_options(tmp_path):
    write_pair(tmp_path, "train", "de", "en", GOOD_DE, GOOD_EN)
    rc, stderr = run_tool("tools/preprocess_data.py", "--input-dir", tmp_path, "--tokenizer", tmp_path / "nope.model",
                          "--output-dir", tmp_path / "out")
    assert rc == 2 and "nope.model: tokenizer model not found" in stderr and "Traceback" not in stderr
    rc, stderr = run_tool("tools/preprocess_data.py", "--input-dir", tmp_path, "--tokenizer", tmp_path / "x",
                          "--output-dir", tmp_path / "out", "--workers", "0")
    assert rc == 2 and "--workers must be >= 1" in stderr


def test_other_tools_user_errors(tmp_path):
    rc, stderr = run_tool("tools/train_tokenizer.py", "--input-dir", tmp_path / "none", "--output-prefix",
                          tmp_path / "spm")
    assert rc == 2 and "input directory does not exist" in stderr and "Traceback" not in stderr
    rc, stderr = run_tool("tools/data_stats.py", "--data-dir", tmp_path)
    assert rc == 2 and "manifest.json: not found" in stderr
    rc, stderr = run_tool("examples/bible/prepare_data.py", "--output-dir", tmp_path / "b", "--languages", "xx")
    assert rc == 2 and "unknown language 'xx'" in stderr and "Traceback" not in stderr
    for tool in ("tools/train_tokenizer.py", "tools/preprocess_data.py", "tools/data_stats.py",
                 "examples/bible/prepare_data.py"):
        rc, out = subprocess.run([sys.executable, str(ROOT / tool), "--help"], capture_output=True,
                                 text=True).returncode, ""
        assert rc == 0
