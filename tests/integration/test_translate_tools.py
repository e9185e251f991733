"""tools/translate.py and tools/evaluate.py on a tiny trained run: the CLI's output equals `Translator`'s, the table
has the paper's rows and columns, its scores equal sacrebleu on the written hypotheses, and bad input fails cleanly."""

import csv
import io
import json
import subprocess
import sys

import pytest
import sacrebleu
import torch

from megatron_taskmoe.inference import Translator, TranslatorConfig, load_checkpoint
from megatron_taskmoe.parallel import groups

from tests.helpers import tiny_run

ROOT = tiny_run.ROOT
sys.path.insert(0, str(ROOT / "tools"))
import evaluate  # noqa: E402
import translate  # noqa: E402


def tool(script, *args, stdin=None):
    env_cmd = [sys.executable, str(ROOT / "tools" / script), *map(str, args)]
    return subprocess.run(env_cmd, input=stdin, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root, run_dir = tiny_run.shared_run(tmp_path_factory)
    yield root, run_dir
    if torch.distributed.is_initialized():
        groups.destroy()


def test_translate_cli_equals_translator(run, tmp_path):
    root, run_dir = run
    sentences = (root / "raw" / "test.en-de.en").read_text().splitlines()[:9] + ["", "the big dog"]
    result = tool("translate.py", "--checkpoint", run_dir, "--source-lang", "en", "--target-lang", "de", "--beam",
                  "3", "--batch-size", "4", "--device", "cpu", stdin="\n".join(sentences) + "\n")
    assert result.returncode == 0, result.stderr
    cli = result.stdout.split("\n")
    assert cli[-1] == "" and len(cli) == len(sentences) + 1
    loaded = load_checkpoint(run_dir, device="cpu")
    want = Translator(loaded, TranslatorConfig(beam_size=3, batch_size=4)).translate(sentences, "en", "de")
    assert cli[:-1] == want

    # the same through --input, greedy, in-process (stdout captured), against Translator's greedy output
    src = tmp_path / "in.en"
    src.write_text("\n".join(sentences), encoding="utf-8")  # no final newline: still every line
    out = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, out
    try:
        assert translate.main(["--checkpoint", str(run_dir / "checkpoints"), "--source-lang", "en", "--target-lang",
                               "de", "--input", str(src), "--beam", "1", "--device", "cpu"]) == 0
    finally:
        sys.stdout = sys_stdout
    greedy = Translator(loaded, TranslatorConfig(beam_size=1, batch_size=32)).translate(sentences, "en", "de")
    assert out.getvalue().split("\n")[:-1] == greedy


def test_translate_cli_unknown_direction(run):
    result = tool("translate.py", "--checkpoint", run[1], "--source-lang", "de", "--target-lang", "fr",
                  stdin="ein hund\n")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"translate.py: error: {run[1]}/checkpoints/step_00000030: direction de-fr was "
                                     "not trained (the checkpoint's task map has de-en, en-de, en-fr, fr-en)")


def in_process(main, argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args, message", [
    (["--source-lang", "en", "--target-lang", "de", "--beam", "0"], "beam_size must be >= 1"),
    (["--source-lang", "en", "--target-lang", "de", "--batch-size", "0"], "batch_size must be >= 1"),
    (["--source-lang", "en", "--target-lang", "de", "--input", "/nonexistent/in.txt"],
     "/nonexistent/in.txt: cannot read input"),
    pytest.param(["--source-lang", "en", "--target-lang", "de", "--device", "cuda", "--input", "/dev/null"],
                 "CUDA is not available", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_translate_errors(run, capsys, args, message):
    code, out, err = in_process(translate.main, ["--checkpoint", run[1], *args], capsys)
    assert code == 2 and message in err and out == ""
    assert len(err.strip().splitlines()) == 1, err


def test_translate_missing_checkpoint_and_bad_utf8(run, tmp_path, capsys):
    code, _, err = in_process(translate.main, ["--checkpoint", tmp_path / "none", "--source-lang", "en",
                                               "--target-lang", "de", "--input", "/dev/null"], capsys)
    assert code == 2 and "no such checkpoint directory" in err
    bad = tmp_path / "bad.en"
    bad.write_bytes(b"the dog\ncaf\xe9\n")
    code, _, err = in_process(translate.main, ["--checkpoint", run[1], "--source-lang", "en", "--target-lang", "de",
                                               "--input", bad], capsys)
    assert code == 2 and f"{bad}:2: invalid UTF-8" in err


def test_evaluate_table_rows_columns_and_scores(run, tmp_path):
    root, run_dir = run
    out, hyps = tmp_path / "table.json", tmp_path / "hyps"
    ckpts = run_dir / "checkpoints"
    result = tool("evaluate.py", "--checkpoint", ckpts / "step_00000030", "--system", "final",
                  "--checkpoint", ckpts / "step_00000015", "--system", "half", "--data", root / "raw",
                  "--beam", "2", "--format", "json", "--output", out, "--hypotheses-dir", hyps, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    directions = ["de-en", "fr-en", "en-de", "en-fr"]  # the paper's order: into English, then out of it
    for metric in ("bleu", "chrf"):
        rows = doc[metric]
        assert [r["system"] for r in rows] == ["final", "half"]
        assert list(rows[0]) == ["system", *directions, "avg xx-en", "avg en-xx", "avg"]
    for system in ("final", "half"):
        for d in directions:
            src, tgt = d.split("-")
            pair = "en-" + (src if tgt == "en" else tgt)
            refs = (root / "raw" / f"test.{pair}.{tgt}").read_text().splitlines()
            hyp = (hyps / f"{system}.test.{d}.txt").read_text().split("\n")[:-1]
            assert len(hyp) == len(refs) == 24
            row = {r["system"]: r for r in doc["bleu"]}[system]
            assert row[d] == pytest.approx(sacrebleu.corpus_bleu(hyp, [refs]).score, abs=1e-9)
            chrf_row = {r["system"]: r for r in doc["chrf"]}[system]
            assert chrf_row[d] == pytest.approx(sacrebleu.corpus_chrf(hyp, [refs]).score, abs=1e-9)
        assert row["avg"] == pytest.approx(sum(row[d] for d in directions) / 4)
        assert chrf_row["avg xx-en"] == pytest.approx((chrf_row["de-en"] + chrf_row["fr-en"]) / 2)
    assert doc["details"]["final"]["step"] == 30 and doc["details"]["half"]["step"] == 15
    assert any(doc["chrf"][0][d] > 0 for d in directions)
    # the final checkpoint's hypotheses are what Translator produces with the same options
    loaded = load_checkpoint(ckpts / "step_00000030", device="cpu")
    sources = (root / "raw" / "test.en-fr.en").read_text().splitlines()
    want = Translator(loaded, TranslatorConfig(beam_size=2)).translate(sources, "en", "fr")
    assert (hyps / "final.test.en-fr.txt").read_text().split("\n")[:-1] == want


def test_evaluate_csv_markdown_and_direction_choice(run, tmp_path, capsys):
    root, run_dir = run
    common = ["--checkpoint", str(run_dir), "--data", str(root / "raw"), "--beam", "1", "--max-sentences", "5",
              "--directions", "en-de", "de-en", "--device", "cpu"]
    assert evaluate.main([*common, "--format", "csv", "--metric", "bleu"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["metric"] for r in rows] == ["bleu"] and rows[0]["system"] == f"{run_dir.name}@30"
    assert list(rows[0]) == ["metric", "system", "de-en", "en-de", "avg xx-en", "avg en-xx", "avg"]
    assert evaluate.main([*common, "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert "### BLEU" in text and "### chrF" in text
    assert "| system | de-en | en-de | avg xx-en | avg en-xx | avg |" in text and f"| {run_dir.name}@30 |" in text


def test_dtype_option_decodes_in_bf16(run, tmp_path, capsys):
    """translate.py --dtype bf16 prints what `Translator` gives on the bf16-loaded model; evaluate.py --dtype bf16
    writes those hypotheses and records the precision in its JSON details."""
    root, run_dir = run
    sentences = (root / "raw" / "test.en-de.en").read_text().splitlines()[:6]
    src = tmp_path / "in.en"
    src.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    code, out, err = in_process(translate.main, ["--checkpoint", run_dir, "--source-lang", "en", "--target-lang",
                                                 "de", "--input", src, "--beam", "2", "--device", "cpu", "--dtype",
                                                 "bf16"], capsys)
    assert code == 0, err
    half = load_checkpoint(run_dir, device="cpu", dtype="bf16")
    want = Translator(half, TranslatorConfig(beam_size=2)).translate(sentences, "en", "de")
    assert out.split("\n")[:-1] == want
    hyps, table = tmp_path / "hyps", tmp_path / "table.json"
    code, out, err = in_process(evaluate.main, ["--checkpoint", run_dir, "--system", "half", "--data", root / "raw",
                                                "--directions", "en-de", "--max-sentences", "6", "--beam", "2",
                                                "--device", "cpu", "--dtype", "bf16", "--hypotheses-dir", hyps,
                                                "--format", "json", "--output", table], capsys)
    assert code == 0, err
    assert (hyps / "half.test.en-de.txt").read_text().split("\n")[:-1] == want
    assert json.loads(table.read_text())["details"]["half"]["dtype"] == "bf16"
    with pytest.raises(SystemExit) as bad:
        translate.main(["--checkpoint", str(run_dir), "--source-lang", "en", "--target-lang", "de", "--dtype", "fp8"])
    assert bad.value.code == 2 and "--dtype: invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--directions", "de-fr"], "--directions de-fr: no test text for it"),
    (["--directions", "deen"], "expected src-tgt"),
    (["--system", "a", "--system", "b"], "2 --system labels for 1 --checkpoint"),
    (["--split", "dev"], "no 'dev' bitext files"),
    (["--max-sentences", "-1"], "--max-sentences must be >= 0"),
    (["--beam", "0"], "beam_size must be >= 1"),
])
def test_evaluate_errors(run, capsys, extra, message):
    root, run_dir = run
    code, out, err = in_process(evaluate.main, ["--checkpoint", run_dir, "--data", root / "raw", *extra], capsys)
    assert code == 2 and message in err and out == "", err


def test_evaluate_untrained_direction_and_missing_data(run, tmp_path, capsys):
    root, run_dir = run
    for name in ("test.de-fr.de", "test.de-fr.fr"):
        (tmp_path / name).write_text("ein hund\n", encoding="utf-8")
    code, _, err = in_process(evaluate.main, ["--checkpoint", run_dir, "--data", tmp_path, "--directions", "de-fr"],
                              capsys)
    assert code == 2 and "was not trained on it" in err
    code, _, err = in_process(evaluate.main, ["--checkpoint", run_dir, "--data", tmp_path], capsys)
    assert code == 2 and "none of the test directions (de-fr, fr-de) was trained" in err
    code, _, err = in_process(evaluate.main, ["--checkpoint", run_dir, "--data", tmp_path / "missing"], capsys)
    assert code == 2 and "input directory does not exist" in err
    result = tool("evaluate.py", "--checkpoint", run_dir, "--data", root / "raw", "--format", "xml")
    assert result.returncode == 2 and "invalid choice: 'xml'" in result.stderr
