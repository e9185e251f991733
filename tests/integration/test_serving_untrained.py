"""benchmarks/serving.py --untrained end to end at the tiny size, on the tiny generated corpus prepared in place of
its Bible data step: both systems initialised into single files (step 0, the run's config), the task-MoE's
sub-network extracted (--verify) into a single file, exported to CTranslate2 float32 (--verify) and int8, and all
five systems measured; results.md says the models are untrained. tools/translate.py serves the single files."""

from __future__ import annotations

import json

import pytest

from megatron_taskmoe.checkpoint.record import CheckpointRecord
from megatron_taskmoe.checkpoint_tools.single_file import read_meta
from tests.helpers import tiny_run
from tests.helpers.corpus import run_tool

SYSTEMS = ("token-MoE (whole)", "task-MoE (whole)", "task-MoE (extracted)", "task-MoE -> CTranslate2 fp32",
           "task-MoE -> CTranslate2 int8")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving")
    tiny_run.prepare_serving_out(out)
    r = run_tool("benchmarks/serving.py", "--out", str(out), "--untrained", "--size", "tiny", "--experts", "2",
                 "--sentences", "3", "--repeats", "1", "--threads", "1", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def test_serving_untrained_measures_all_five_systems_on_initialised_models(served):
    out, stdout = served
    md = (out / "results.md").read_text()
    assert md.splitlines()[0].endswith("size `tiny`, UNTRAINED models (throughput only)")
    assert "BLEU and chrF are not meaningful" in md
    for name in SYSTEMS:
        assert f"| {name} | " in md, name
    doc = json.loads((out / "results.json").read_text())
    assert doc["untrained"] is True and "throughput only" in doc["note"]
    assert set(doc["results"]) == set(SYSTEMS)
    whole, extracted = doc["results"]["task-MoE (whole)"], doc["results"]["task-MoE (extracted)"]
    assert whole["tokens"] == extracted["tokens"] > 0 and whole["sample"] == extracted["sample"]
    for name in SYSTEMS:  # CTranslate2 too never produces <s> (which an untrained model prefers): no empty text
        assert all(all(texts) for texts in doc["results"][name]["sample"].values()), (name, doc["results"][name])

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    for system in ("token", "task"):
        trained = json.loads((out / system / "trained.json").read_text())
        assert trained["untrained"] is True and trained["init_s"] >= 0 and trained["config"]["train"]["seed"] == 1234
        assert doc["trained"][system] == trained
        record = CheckpointRecord.from_dict(read_meta(out / system / "model.safetensors"))
        assert (record.step, record.task_map, record.languages) == (0, manifest["task_map"], manifest["languages"])
        assert record.model_config["moe"]["num_experts"] == 2 and record.model_config["hidden_size"] == 64
    assert not (out / "token" / "run").exists() and "trained token" not in stdout
    extract = json.loads((out / "task" / "extracted_en.safetensors.extract.json").read_text())
    assert extract["verify"]["max_abs_logit_difference"] <= extract["verify"]["tolerance"]
    assert (out / "task" / "ct2_en_float32" / "model.bin").is_file()
    assert (out / "task" / "ct2_en_int8" / "model.bin").is_file()

    # the same --out without --untrained is refused before any work (it would reuse the untrained serving forms)
    r = run_tool("benchmarks/serving.py", "--out", str(out), "--size", "tiny", "--experts", "2")
    assert r.returncode == 2 and "holds untrained models" in r.stderr


def test_translate_serves_single_files(served):
    out, _ = served
    source = out / "raw" / "test.en-de.de"
    outputs = {}
    for name in ("task/model.safetensors", "task/extracted_en.safetensors"):
        r = run_tool("tools/translate.py", "--checkpoint", str(out / name), "--source-lang", "de", "--target-lang",
                     "en", "--input", str(source), "--beam", "2", "--max-len-b", "4", "--device", "cpu")
        assert r.returncode == 0, r.stderr[-3000:]
        outputs[name] = r.stdout.splitlines()
    lines = source.read_text().splitlines()
    assert len(outputs["task/model.safetensors"]) == len(lines)
    assert outputs["task/model.safetensors"] == outputs["task/extracted_en.safetensors"]
    r = run_tool("tools/translate.py", "--checkpoint", str(out / "task/extracted_en.safetensors"), "--source-lang",
                 "en", "--target-lang", "de", "--input", str(source))
    assert r.returncode == 2 and "direction en-de was not trained" in r.stderr, r.stderr[-2000:]
