"""tools/checkpoint/export_ctranslate2.py on trained checkpoints (the maths and randomly initialised reference
models: tests/unit/test_export_ctranslate2.py):

  * a tiny task-routed run trained by pretrain_mt.py: its sub-network extracted by extract_task.py exports from the
    checkpoint through the CLI with --verify on real test sentences and int8; the export.py directory exports in
    process and `Ct2Translator` translates raw sentences as `ReferenceTranslator` does;
  * bad CLI input exits 2 naming the option and writes nothing.
Each export is in process where the source is an export directory (no process group); the CLI on trainer
checkpoints runs as a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import tiny_run
from tests.helpers.corpus import run_tool

ctranslate2 = pytest.importorskip("ctranslate2")

TOOL = "tools/checkpoint/export_ctranslate2.py"
TASK_BOTH = ("model.system=moe_token", "model.overrides.moe.encoder.mode=task",
             "model.overrides.moe.decoder.mode=task", "eval.interval=0")
SENTENCES = tiny_run.sentences("en", 302, 8) + ["the old man has a small dog and a cat"]


# ------------------------------------------------------------------------------------------------ trained model
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny task-routed run (task routing by pair on both sides, no adapters) and its export.py directory."""
    root, run_dir = tiny_run.shared_run(tmp_path_factory, steps=20, overrides=TASK_BOTH)
    export_dir = tmp_path_factory.mktemp("ct2_reference") / "export"
    r = run_tool("tools/checkpoint/export.py", str(run_dir / "checkpoints"), str(export_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return root, run_dir, export_dir


def test_extracted_subnetwork_exports_from_the_checkpoint_with_verify_and_int8(trained, tmp_path):
    root, run_dir, _ = trained
    sub = tmp_path / "en_de"
    r = run_tool("tools/checkpoint/extract_task.py", str(run_dir / "checkpoints"), str(sub), "--task", "en-de")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "ct2_en_de"
    r = run_tool(TOOL, str(sub), str(out), "--verify", "--verify-data", str(root / "raw"), "--verify-sentences", "16",
                 "--quantization", "int8")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    fp32, int8 = summary["verify"]["float32"], summary["verify"]["quantized"]
    assert fp32["passed"] and fp32["scored"] == "references" and fp32["sentences"] == 16
    assert fp32["max_abs_token_logprob_difference"] <= 1e-4
    assert 0.0 <= int8["greedy_agreement"] <= 1.0 and int8["max_abs_token_logprob_difference"] > 0
    assert summary["directions"] == ["en-de"] and summary["quantization"] == "int8"
    record = json.loads((out / "taskmoe_serving.json").read_text())
    assert record["quantization"] == "int8" and record["verify"]["float32"]["passed"]
    assert not list(tmp_path.glob(".*"))


def test_export_directory_serves_as_the_reference_translator(trained, tmp_path):
    from megatron_taskmoe.reference import ReferenceTranslator, load
    from megatron_taskmoe.serving import Ct2Translator
    from megatron_taskmoe.serving.export import export_ctranslate2

    _, _, export_dir = trained
    out = tmp_path / "ct2_de"
    summary = export_ctranslate2(export_dir, out, target_langs=["de"], verify=True, verify_sentences=8)
    assert summary["verify"]["float32"]["passed"]
    want = ReferenceTranslator(load(export_dir), beam_size=1, max_len_b=5).translate(SENTENCES, "en", "de")
    got = Ct2Translator(out, beam_size=1, max_len_b=5).translate(SENTENCES, "en", "de")
    assert got == want and any(want)
    beam = Ct2Translator(out, beam_size=4).translate(SENTENCES, "en", "de")
    assert len(beam) == len(SENTENCES) and any(beam)
    with pytest.raises(ValueError, match=r"direction de-en is not served by .* \(it serves en-de\)"):
        Ct2Translator(out).translate(SENTENCES, "de", "en")


def _tool(argv, capsys) -> tuple[int, str, str]:
    """The CLI's main in process (for inputs refused before any checkpoint is read): exit code, stdout, stderr."""
    import importlib.util

    from megatron_taskmoe.checkpoint_tools.cli import run

    spec = importlib.util.spec_from_file_location("export_ctranslate2", Path(tiny_run.ROOT, TOOL))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        code = run(lambda: module.main([str(a) for a in argv]), "export_ctranslate2.py")
    except SystemExit as e:  # argparse: --help (0) and invalid choices (2)
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_bad_inputs_exit_2_and_write_nothing(tmp_path, tmp_path_factory, capsys):
    code, out, _ = _tool(["--help"], capsys)
    assert code == 0 and "--verify" in out and "--quantization" in out
    missing = tmp_path / "no_such_run"
    code, _, err = _tool([missing, tmp_path / "a"], capsys)
    assert code == 2 and f"{missing}: no such file or directory" in err, err
    (tmp_path / "exists").mkdir()
    code, _, err = _tool([missing, tmp_path / "exists"], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = _tool([missing, tmp_path / "b", "--verify-sentences", "0"], capsys)
    assert code == 2 and "--verify-sentences 0 must be >= 1" in err
    code, _, err = _tool([missing, tmp_path / "b", "--verify-data", tmp_path / "nowhere"], capsys)
    assert code == 2 and f"--verify-data {tmp_path / 'nowhere'}: no such directory" in err
    code, _, err = _tool([missing, tmp_path / "b", "--quantization", "int4"], capsys)
    assert code == 2 and "invalid choice: 'int4'" in err
    # the session's shared-dynamic run: token+task routing and adapters, refused by name from the checkpoint (a
    # subprocess: reading a trainer checkpoint makes a process group)
    _, shared = tiny_run.shared_run(tmp_path_factory)
    r = run_tool(TOOL, str(shared), str(tmp_path / "c"), "--task", "en-de")
    assert r.returncode == 2 and "cannot be served as a dense Transformer exactly" in r.stderr, r.stderr[-2000:]
    assert "encoder.layers.0" in r.stderr and "shared_dynamic task adapters" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
