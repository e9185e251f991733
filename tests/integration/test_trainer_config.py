"""Bad configurations fail before any work: clear message naming the option, exit code 2, no run directory."""

import json
import shutil

import pytest

from tests.helpers.corpus import run_tool

CONFIG = "examples/configs/tiny_cpu.yaml"


def _pretrain(tmp_path, data_dir, *overrides, world_size=1):
    run_dir = tmp_path / "run"
    args = ["pretrain_mt.py", "--config", CONFIG, "--set", f"data.data_dir={data_dir}",
            "--set", f"train.run_dir={run_dir}", *[x for o in overrides for x in ("--set", o)]]
    r = run_tool(*args, env={"WORLD_SIZE": str(world_size), "RANK": "0"}, timeout=300)
    return r, run_dir


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tensor=3"], 3, "num_attention_heads=4 is not divisible by ParallelConfig.tensor=3"),
        (["parallel.expert=3"], 3, "num_experts=4 is not divisible by ParallelConfig.expert=3"),
        (["parallel.pipeline=3", "parallel.encoder_pipeline_stages=2", "model.overrides.encoder_layers=3",
          "train.micro_batches=4"], 3, "not divisible by their pipeline stages"),
        (["parallel.pipeline=2", "parallel.encoder_pipeline_stages=1"], 2, "train.micro_batches=1 should be >="),
        (["parallel.tensor=2"], 3,
         "world size 3 is not divisible by ParallelConfig.tensor x ParallelConfig.pipeline = 2 x 1"),
        (["model.system=moe_tokn"], 1, "model.system"),
        (["optim.lr=-1"], 1, "optim.lr"),
        (["train.stepz=3"], 1, "train.stepz"),
    ],
)
def test_bad_parallel_and_model_configs(tmp_path, bible_data, overrides, world, message):
    r, run_dir = _pretrain(tmp_path, bible_data, *overrides, world_size=world)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not run_dir.exists()


def test_missing_data_directory(tmp_path):
    r, run_dir = _pretrain(tmp_path, tmp_path / "nowhere")
    assert r.returncode == 2 and "data.data_dir" in r.stderr and "no such directory" in r.stderr
    assert not run_dir.exists()


def test_unknown_direction(tmp_path, bible_data):
    r, _ = _pretrain(tmp_path, bible_data, "data.directions=[de-en, xx-en]")
    assert r.returncode == 2 and "xx-en not in" in r.stderr


def test_task_map_disagreeing_with_checkpoint(tmp_path, bible_data):
    """A checkpoint trained with one task map refuses data whose manifest maps tasks differently."""
    r, run_dir = _pretrain(tmp_path, bible_data, "train.steps=2", "checkpoint.interval=2", "eval.interval=0")
    assert r.returncode == 0, r.stderr[-3000:]
    other = tmp_path / "other_bin"
    shutil.copytree(bible_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    d2t = manifest["task_map"]["direction_to_task"]
    first, second = sorted(d2t)[:2]
    d2t[first], d2t[second] = d2t[second], d2t[first]
    for d in (first, second):
        manifest["directions"][d]["task_id"] = d2t[d]
    (other / "manifest.json").write_text(json.dumps(manifest))
    r2, _ = _pretrain(tmp_path, other, "train.steps=4", "eval.interval=0")
    assert r2.returncode == 2, r2.stderr[-3000:]
    assert "task map" in r2.stderr and "disagrees" in r2.stderr


def test_model_that_disagrees_with_checkpoint(tmp_path, bible_data):
    r, run_dir = _pretrain(tmp_path, bible_data, "train.steps=2", "checkpoint.interval=2", "eval.interval=0")
    assert r.returncode == 0, r.stderr[-3000:]
    r2, _ = _pretrain(tmp_path, bible_data, "train.steps=4", "eval.interval=0", "model.overrides.ffn_hidden_size=64")
    assert r2.returncode == 2, r2.stderr[-3000:]
    assert "holds a different model" in r2.stderr and "model.overrides.ffn_hidden_size: checkpoint 128" in r2.stderr
