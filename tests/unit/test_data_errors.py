"""Data that cannot train anything is refused by every data tool: a bitext whose pairs the filters remove entirely,
a language without sentences, a corpus without training pairs (errors naming the files and the filter counts,
exit 2, nothing left on disk); heavy filtering is a warning with the counts; data_stats.py on an empty or broken
directory is a one-line error. In-process calls of the tools' main()."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import data_stats  # noqa: E402
import preprocess_data  # noqa: E402
import train_tokenizer  # noqa: E402

from megatron_taskmoe.data import MultilingualDataset  # noqa: E402
from megatron_taskmoe.data.bitext import DataError  # noqa: E402

EN = [f"the house number {i} is small and red" for i in range(40)]
DE = [f"das haus nummer {i} ist klein und rot" for i in range(40)]
FR = [f"la maison numero {i} est petite et rouge" for i in range(40)]


def write_pair(root: Path, split, src, tgt, src_lines, tgt_lines):
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.{src}-{tgt}.{src}").write_text("".join(s + "\n" for s in src_lines), encoding="utf-8")
    (root / f"{split}.{src}-{tgt}.{tgt}").write_text("".join(s + "\n" for s in tgt_lines), encoding="utf-8")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    write_pair(corpus, "train", "de", "en", DE, EN)
    write_pair(corpus, "train", "fr", "en", FR, EN)
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    assert train_tokenizer.main(["--input-dir", str(corpus), "--output-prefix", str(prefix), "--vocab-size", "80",
                                 "--sentences", "500", "--threads", "1"]) == 0
    return Path(f"{prefix}.model")


def stderr_lines(capsys) -> list[str]:
    """stderr without the progress bars."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if "%|" not in line]


def one_error_line(capsys, tool) -> str:
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"{tool}: error: "), err
    return err[0]


def preprocess(inp, out, spm_model, *extra):
    return preprocess_data.main(["--input-dir", str(inp), "--tokenizer", str(spm_model), "--output-dir", str(out),
                                 "--workers", "2", "--no-progress", *map(str, extra)])


def assert_nothing_written(out: Path):
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], list(out.rglob("*"))


def test_blank_side_is_refused_before_encoding(spm_model, tmp_path, capsys):
    """The issue's case: a wrong column cut from a TSV leaves the non-English side empty on every line."""
    write_pair(tmp_path / "in", "train", "de", "en", DE, EN)
    write_pair(tmp_path / "in", "train", "fr", "en", [""] * 40, EN)
    assert preprocess(tmp_path / "in", tmp_path / "out", spm_model) == 2
    line = one_error_line(capsys, "preprocess_data.py")
    assert "train.fr-en.fr" in line and "train.fr-en.en" in line and "every fr side of the 40 pairs" in line
    assert "(empty 40, too_long 0, ratio 0)" in line
    assert not (tmp_path / "out").exists()


def test_all_pairs_filtered_is_an_error_with_the_counts(spm_model, tmp_path, capsys):
    write_pair(tmp_path / "in", "train", "de", "en", DE, EN)
    long_fr = [" ".join([s] * 3) for s in FR]  # every fr sentence more than 3x its English side: ratio filter
    write_pair(tmp_path / "in", "train", "fr", "en", long_fr[:30] + [" "] * 10, EN)
    assert preprocess(tmp_path / "in", tmp_path / "out", spm_model, "--max-ratio", "2", "--max-len", 0) == 2
    line = one_error_line(capsys, "preprocess_data.py")
    assert "train.fr-en.fr, " in line and "the filters removed all 40 pairs of train.fr-en" in line
    assert "(empty 10, too_long 0, ratio 30; --max-len 0, --max-ratio 2.0)" in line and "nothing was written" in line
    assert "train.de-en" not in line
    assert not (tmp_path / "out").exists()


def test_a_split_filtered_away_is_an_error_and_keeps_the_old_output(spm_model, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_pair(inp, "train", "de", "en", DE, EN)
    assert preprocess(inp, out, spm_model) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_pair(inp, "valid", "de", "en", [" ".join([s] * 20) for s in DE[:5]], EN[:5])
    capsys.readouterr()
    assert preprocess(inp, out, spm_model, "--max-len", 50) == 2
    line = one_error_line(capsys, "preprocess_data.py")
    assert "valid.de-en.de" in line and "the filters removed all 5 pairs of valid.de-en (empty 0, too_long 5" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output, untouched


def test_no_training_pairs(spm_model, tmp_path, capsys):
    write_pair(tmp_path / "in", "valid", "de", "en", DE, EN)
    write_pair(tmp_path / "in", "test", "de", "en", DE, EN)
    assert preprocess(tmp_path / "in", tmp_path / "out", spm_model) == 2
    line = one_error_line(capsys, "preprocess_data.py")
    assert "no training pairs: no train.* bitext files (splits found: test, valid;" in line
    assert_nothing_written(tmp_path / "out")
    assert preprocess(tmp_path / "in", tmp_path / "out", spm_model, "--splits", "valid") == 0  # asked for


def test_empty_file(spm_model, tmp_path, capsys):
    write_pair(tmp_path / "in", "train", "de", "en", [], [])
    assert preprocess(tmp_path / "in", tmp_path / "out", spm_model) == 2
    assert "train.de-en.de, " in one_error_line(capsys, "preprocess_data.py")
    assert_nothing_written(tmp_path / "out")


def test_heavy_filtering_is_a_warning_with_the_counts(spm_model, tmp_path, capsys):
    write_pair(tmp_path / "in", "train", "de", "en", DE[:34] + [""] * 6, EN)  # 15% empty
    write_pair(tmp_path / "in", "train", "fr", "en", FR[:38] + [""] * 2, EN)  # 5%
    assert preprocess(tmp_path / "in", tmp_path / "out", spm_model) == 0
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("preprocess_data.py: warning: "), err
    assert "train.de-en.de" in err[0] and "removed 6 of the 40 pairs of train.de-en (15.0%, more than 10%: " \
                                          "empty 6, too_long 0, ratio 0;" in err[0]
    assert preprocess(tmp_path / "in", tmp_path / "out2", spm_model, "--warn-removed", 0.2) == 0
    assert capsys.readouterr().err == ""


def test_tokenizer_refuses_a_language_without_sentences(tmp_path, capsys):
    write_pair(tmp_path / "in", "train", "de", "en", DE, EN)
    write_pair(tmp_path / "in", "train", "fr", "en", ["  "] * 40, EN)
    prefix = tmp_path / "out" / "spm"
    assert train_tokenizer.main(["--input-dir", str(tmp_path / "in"), "--output-prefix", str(prefix),
                                 "--vocab-size", "80", "--sentences", "200", "--threads", "1"]) == 2
    line = one_error_line(capsys, "train_tokenizer.py")
    assert "language 'fr' has no sentences to train on: " in line and "train.fr-en.fr (40 lines, all blank)" in line
    assert_nothing_written(tmp_path / "out")


def test_tokenizer_warns_about_a_blank_side_of_a_language_found_elsewhere(tmp_path, capsys):
    write_pair(tmp_path / "in", "train", "de", "en", DE, EN)
    write_pair(tmp_path / "in", "train", "fr", "en", FR, [""] * 40)
    assert train_tokenizer.main(["--input-dir", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "spm"),
                                 "--vocab-size", "80", "--sentences", "200", "--threads", "1"]) == 0
    assert stderr_lines(capsys) == [
        f"train_tokenizer.py: warning: {tmp_path / 'in' / 'train.fr-en.en'} (40 lines, all blank): no en sentences "
        "there (the language has 40 elsewhere)"]


@pytest.fixture
def data_dir(spm_model, tmp_path):
    write_pair(tmp_path / "in", "train", "de", "en", DE, EN)
    assert preprocess(tmp_path / "in", tmp_path / "bin", spm_model) == 0
    return tmp_path / "bin"


def _drop_field(manifest):
    del manifest["directions"]["de-en"]["splits"]["train"]["src_tokens"]


def _wrong_type(manifest):
    manifest["directions"]["de-en"]["splits"]["train"]["sentences"] = "40"


def _no_sentences(manifest):  # what the preprocessing of old wrote for a direction whose pairs were all filtered
    for d in manifest["directions"].values():
        d["splits"]["train"].update(sentences=0, src_tokens=0, tgt_tokens=0)


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: shutil.rmtree(d), "data directory does not exist"),
    (lambda d: [p.unlink() for p in d.iterdir()], "manifest.json: not found"),
    (lambda d: (d / "manifest.json").write_text("{"), "manifest.json: invalid JSON"),
    (lambda d: (d / "manifest.json").write_text("[]"), "manifest.json: format_version None"),
    (lambda d: _edit(d, _drop_field), "missing field 'directions.de-en.splits.train.src_tokens'"),
    (lambda d: _edit(d, _wrong_type), "field 'directions.de-en.splits.train.sentences' should be of type int"),
    (lambda d: _edit(d, _no_sentences), "the 'train' split has no sentences in any direction (de-en, en-de)"),
    (lambda d: (d / "train.de-en.de.bin").unlink(), "train.de-en.de.bin: missing"),
    (lambda d: (d / "train.de-en.en.idx").write_bytes((d / "train.de-en.en.idx").read_bytes()[:-8]),
     "train.de-en.en.idx: "),
    (lambda d: (d / "train.de-en.en.bin").write_bytes(b"\0\0"), "train.de-en.en.bin: 2 bytes, expected"),
])
def test_data_stats_on_broken_directories(data_dir, capsys, breakage, expected):
    assert data_stats.main(["--data-dir", str(data_dir)]) == 0
    capsys.readouterr()
    breakage(data_dir)
    assert data_stats.main(["--data-dir", str(data_dir)]) == 2
    assert expected in one_error_line(capsys, "data_stats.py")


def _edit(data_dir, change):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    change(manifest)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def test_dataset_refuses_a_direction_without_sentences(data_dir):
    _edit(data_dir, lambda m: m["directions"]["de-en"]["splits"]["train"].update(sentences=0))
    with pytest.raises(DataError, match="direction.s. de-en have no 'train' sentences"):
        MultilingualDataset(data_dir, "train")
    assert len(MultilingualDataset(data_dir, "train", directions=["en-de"])) == 40


def test_data_stats_checks_the_reference_texts(spm_model, tmp_path, capsys):
    write_pair(tmp_path / "in", "train", "de", "en", DE, EN)
    write_pair(tmp_path / "in", "valid", "de", "en", DE[:10], EN[:10])
    assert preprocess(tmp_path / "in", tmp_path / "bin", spm_model) == 0
    assert data_stats.main(["--data-dir", str(tmp_path / "bin"), "--split", "valid"]) == 0
    capsys.readouterr()
    ref = tmp_path / "bin" / "valid.de-en.ref.en"
    assert ref.read_text(encoding="utf-8") == "".join(s + "\n" for s in EN[:10])
    ref.write_text("".join(s + "\n" for s in EN[:9]), encoding="utf-8")
    assert data_stats.main(["--data-dir", str(tmp_path / "bin"), "--split", "valid"]) == 2
    assert "valid.de-en.ref.en: 9 lines, but manifest.json says 10 sentences" in one_error_line(capsys, "data_stats.py")
