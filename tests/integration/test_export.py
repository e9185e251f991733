"""tools/checkpoint/export.py and the pure-PyTorch reference model (`megatron_taskmoe/reference/`).

Tiny checkpoints trained by pretrain_mt.py in the test (the session's shared shared-dynamic run, a token-routed-
encoder / target-language-routed-decoder run shared with test_extract_task.py, and a dense gelu+bias run) are
exported; the megatron side runs in subprocesses (the CLI, and `export_helper.py` once for everything else), so
this process loads only the reference model and never creates a process group:
  * logits of the reference equal the megatron model's within 1e-5 (fp32) on a fixed batch with ragged padding,
    and greedy and beam-4 decoding give the same ids, for the trained models and for a matrix of randomly
    initialised models covering every routing mode, capacity/drop policy, top-1/raw top-2, adapter mode,
    activation, norm and bias;
  * translations of real sentences equal `inference.Translator`'s, greedy and beam;
  * a verification that finds a difference raises and leaves neither the output nor its `.partial.` sibling;
  * a bf16 export stores bf16 and computes the same function as megatron on the same rounded weights;
  * loading and translating in a fresh interpreter imports no megatron module (megatron is made unimportable);
  * bad inputs (existing output, missing or corrupt checkpoint, broken export directory) fail naming the path and
    leave nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.corpus import run_tool
from tests.helpers import tiny_run

TOOL = "tools/checkpoint/export.py"
TOL = 1e-5
SENTENCES = tiny_run.sentences("en", 302, 6) + ["the old man has a small dog and a cat"]
SHARED_TOKEN_TASK = dict(steps=20, overrides=("model.system=token_enc_task_dec", "eval.interval=0"))
DENSE = dict(steps=3, overrides=("model.system=dense", "model.overrides.activation=gelu", "model.overrides.bias=true",
                                 "eval.interval=0"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    _, shared = tiny_run.shared_run(tmp_path_factory)
    root, token_task = tiny_run.shared_run(tmp_path_factory, **SHARED_TOKEN_TASK)
    _, dense = tiny_run.shared_run(tmp_path_factory, **DENSE)
    return {"root": root, "shared_dynamic": shared, "token_enc_task_dec": token_task, "dense": dense}


@pytest.fixture(scope="module")
def cli_export(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "shared_dynamic"
    r = run_tool(TOOL, str(runs["shared_dynamic"] / "checkpoints"), str(out), "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def helper(runs, tmp_path_factory):
    """Everything megatron-side except the CLI, in one subprocess (see export_helper.py)."""
    tmp = tmp_path_factory.mktemp("export_helper")
    root = runs["root"]
    manifest = json.loads((root / "bin" / "manifest.json").read_text())
    job = {
        "exports": [[str(runs["token_enc_task_dec"]), str(tmp / "token_enc_task_dec")],
                    [str(runs["dense"]), str(tmp / "dense")],
                    [str(runs["shared_dynamic"]), str(tmp / "shared_bf16"), "bf16"]],
        "failed_verify": [str(runs["dense"]), str(tmp / "failed")],
        "matrix": {"tokenizer": str(root / "spm.model"), "languages": manifest["languages"],
                   "tasks": manifest["task_map"]["tasks"],
                   "out_dir": str(tmp / "matrix")},
        "translate": {"checkpoint": str(runs["shared_dynamic"]), "sentences": SENTENCES, "src": "en", "tgt": "de",
                      "beams": [1, 4], "batch_size": 4},
    }
    (tmp / "matrix").mkdir()
    (tmp / "job.json").write_text(json.dumps(job))
    r = run_tool("-m", "tests.helpers.export_helper", str(tmp / "job.json"))
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, json.loads(r.stdout.strip().splitlines()[-1])


def test_cli_export_writes_a_verified_standalone_directory(cli_export, runs):
    out, summary = cli_export
    assert summary["max_abs_logit_difference"] <= TOL
    assert summary["greedy_identical"] and summary["beam_identical"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert not list(out.parent.glob(".partial.*"))
    checkpoints = runs["shared_dynamic"] / "checkpoints"
    step = checkpoints / (checkpoints / "latest").read_text().strip()
    record = json.loads((step / "checkpoint.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "megatron-taskmoe/reference" and config["format_version"] == 2
    assert config["model"]["embedding_scale"] == pytest.approx(record["model_config"]["hidden_size"] ** 0.5)
    assert config["task_map"] == record["task_map"] and config["languages"] == record["languages"]
    assert config["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert (out / "tokenizer.model").read_bytes() == (step / "tokenizer.model").read_bytes()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert f.get_slice("embed_tokens.weight").get_shape()[0] == record["model_config"]["vocab_size"]
    assert summary["tensors"] == len(names)
    assert not any(s in n for n in names for s in ("linear_qkv", "local_experts", "layernorm", "mlp."))


@pytest.mark.parametrize("name", ["token_enc_task_dec", "dense"])
def test_trained_models_are_reproduced(helper, name):
    tmp, result = helper
    summary = result["exports"][str(tmp / name)]
    assert summary["max_abs_logit_difference"] <= TOL, summary
    assert summary["greedy_identical"] and summary["beam_identical"], summary


def test_every_routing_and_adapter_feature_is_reproduced(helper):
    _, result = helper
    matrix = result["matrix"]
    assert len(matrix) >= 7
    bad = {name: s for name, s in matrix.items()
           if not (s["max_abs_logit_difference"] <= TOL and s["greedy_identical"] and s["beam_identical"])}
    assert not bad, bad


def test_failed_verification_leaves_nothing(helper):
    tmp, result = helper
    failed = result["failed_verify"]
    assert failed["error"].startswith(f"{tmp / 'failed'}: the exported model does not reproduce")
    assert "decoded outputs differ" in failed["error"] and failed["left"] == []


def test_bf16_export_stores_bf16_and_matches_on_rounded_weights(helper):
    tmp, result = helper
    summary = result["exports"][str(tmp / "shared_bf16")]
    assert summary["dtype"] == "bf16" and summary["max_abs_logit_difference"] <= TOL
    from safetensors import safe_open

    with safe_open(str(tmp / "shared_bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    from megatron_taskmoe.reference import load

    exported = load(tmp / "shared_bf16")
    assert exported.config.dtype == "bf16" and exported.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("beam", [1, 4])
def test_translations_equal_the_trainers_translator(cli_export, helper, beam):
    from megatron_taskmoe.reference import ReferenceTranslator, load

    _, result = helper
    expected = result["translate"][str(beam)]
    translator = ReferenceTranslator(load(cli_export[0]), beam_size=beam, batch_size=4)
    assert translator.translate_ids(SENTENCES, "en", "de") == expected["ids"]
    assert translator.translate(SENTENCES, "en", "de") == expected["text"]
    assert any(expected["ids"])  # the trained model produces output, so the comparison is not trivially empty


def test_reference_loads_and_translates_without_megatron(cli_export):
    from megatron_taskmoe.reference import ReferenceTranslator, load

    out = cli_export[0]
    code = (
        "import json, sys\n"
        "sys.modules['megatron'] = None  # any import of megatron-core now fails\n"
        "import torch\n"
        "from megatron_taskmoe.reference import load, ReferenceTranslator\n"
        f"hyp = ReferenceTranslator(load({str(out)!r}), beam_size=2).translate({SENTENCES[:3]!r}, 'en', 'de')\n"
        "mods = sorted(m for m in sys.modules if m.startswith('megatron.') or m == 'megatron' and sys.modules[m])\n"
        "print(json.dumps({'hyp': hyp, 'megatron': mods, 'dist': torch.distributed.is_initialized()}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["megatron"] == [] and got["dist"] is False
    assert got["hyp"] == ReferenceTranslator(load(out), beam_size=2).translate(SENTENCES[:3], "en", "de")


def test_reference_rejects_unknown_directions_and_broken_exports(cli_export, tmp_path):
    import shutil

    from megatron_taskmoe.reference import ExportFormatError, ReferenceTranslator, load

    out = cli_export[0]
    with pytest.raises(ValueError, match="direction de-fr was not trained"):
        ReferenceTranslator(load(out)).translate(["x"], "de", "fr")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    config = json.loads((broken / "config.json").read_text())
    config["format_version"] = 99
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match=r"config\.json.*format_version 99"):
        load(broken)
    shutil.copy(out / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExportFormatError, match=r"model\.safetensors: not a readable safetensors file"):
        load(broken)
    shutil.copy(out / "model.safetensors", broken / "model.safetensors")
    (broken / "tokenizer.model").write_bytes(b"other")
    with pytest.raises(ExportFormatError, match=r"tokenizer\.model: sha256 differs"):
        load(broken)


def test_a_version_1_export_reads_with_unscaled_embeddings(cli_export, tmp_path):
    """Exports written before `embedding_scale` existed (format 1) came from unscaled models, and load that way."""
    import shutil

    import torch

    from megatron_taskmoe.reference import load

    out = cli_export[0]
    old = tmp_path / "v1"
    shutil.copytree(out, old)
    config = json.loads((old / "config.json").read_text())
    config["format_version"] = 1
    del config["model"]["embedding_scale"]
    (old / "config.json").write_text(json.dumps(config))
    new_model, old_model = load(out), load(old)
    assert new_model.config.model.embedding_scale > 1 and old_model.config.model.embedding_scale == 1.0
    tokens = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(old_model.model.embed(tokens) - old_model.model.embed_positions.weight[:3, None],
                               (new_model.model.embed(tokens) - new_model.model.embed_positions.weight[:3, None])
                               / new_model.config.model.embedding_scale)


def test_cli_bad_inputs_fail_cleanly(cli_export, runs, tmp_path):
    out = cli_export[0]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run_tool(TOOL, str(runs["shared_dynamic"]), str(out))
    assert r.returncode == 2 and f"{out}: already exists" in r.stderr, r.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    missing = tmp_path / "no_such_run"
    r = run_tool(TOOL, str(missing), str(tmp_path / "a"))
    assert r.returncode == 2 and str(missing) in r.stderr, r.stderr[-2000:]

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    r = run_tool(TOOL, str(corrupt), str(tmp_path / "b"))
    assert r.returncode == 2 and f"{corrupt}: not a readable safetensors file" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.safetensors"]

    r = run_tool(TOOL, "--help")
    assert r.returncode == 0 and "--verify" in r.stdout and "--dtype" in r.stdout
