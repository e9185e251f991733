"""convert and merge, end to end on tiny checkpoints trained by pretrain_mt.py in the test itself.

The tools run as scripts (they create their own one-process gloo group); this process only reads safetensors.
  * convert: trainer checkpoint -> one safetensors file with --verify (logits identical); bad inputs (a layout the
    model cannot take, a missing shard, a missing checkpoint) exit 2 with a message and write nothing.
  * merge: two models trained on disjoint task sets (en<->de, en<->fr, one tokenizer) -> adapters 2 + 2 = 4, task
    tables re-indexed by name into the union corpus's ids, the rest averaged; the merged checkpoint trains with
    pretrain_mt.py on the union; merging a model with itself (overlapping tasks) is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.corpus import run_tool

CONFIG = "examples/configs/tiny_cpu.yaml"


def _train(data_dir: Path, run_dir: Path, steps: int = 3, *extra: str) -> Path:
    r = run_tool("pretrain_mt.py", "--config", CONFIG, "--set", f"data.data_dir={data_dir}", "--set",
                 f"train.run_dir={run_dir}", "--set", f"train.steps={steps}", "--set", "eval.interval=0", "--set",
                 "train.progress_bar=false", "--set", "optim.warmup_steps=1", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir / "checkpoints"


def _subset_corpus(root: Path, out: Path, language: str, lines: int = 1500) -> Path:
    """The en<->`language` part of the prepared Bible text (first `lines` pairs per split), preprocessed with the
    shared tokenizer, so two models trained on two parts share their vocabulary."""
    raw = out / f"raw_{language}"
    raw.mkdir(parents=True)
    for path in (root / "raw").glob(f"*.en-{language}.*"):
        with open(path, encoding="utf-8") as f:
            head = [line for _, line in zip(range(lines), f)]
        (raw / path.name).write_text("".join(head), encoding="utf-8")
    data = out / f"bin_{language}"
    r = run_tool("tools/preprocess_data.py", "--input-dir", str(raw), "--tokenizer", str(root / "spm.model"),
                 "--output-dir", str(data), "--max-len", "40", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    return data


@pytest.fixture(scope="module")
def trained(bible_data, tmp_path_factory):
    return _train(bible_data, tmp_path_factory.mktemp("ckpt") / "run")


def test_convert_to_single_file_verifies_and_keeps_everything(trained, tmp_path):
    from megatron_taskmoe.checkpoint_tools.single_file import read_single_file

    out = tmp_path / "model.safetensors"
    r = run_tool("tools/checkpoint/convert.py", str(trained), str(out), "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["max_abs_logit_difference"] == 0.0
    single = read_single_file(out)
    step_dir = trained / (trained / "latest").read_text().strip()
    assert single.tokenizer == (step_dir / "tokenizer.model").read_bytes()
    assert single.meta["task_map"] == json.loads((step_dir / "checkpoint.json").read_text())["task_map"]
    assert single.model_config().moe.num_experts == 4
    assert not list(tmp_path.glob(".*"))


def test_convert_bad_inputs_fail_cleanly(trained, tmp_path):
    out = tmp_path / "out"
    r = run_tool("tools/checkpoint/convert.py", str(trained), str(out), "--expert", "3")
    assert r.returncode == 2 and "num_experts=4 is not divisible by ParallelConfig.expert=3" in r.stderr
    assert not out.exists()

    broken = tmp_path / "broken"
    shutil.copytree(trained / (trained / "latest").read_text().strip(), broken)
    shard = sorted(broken.glob("*.distcp"))[0]
    shard.unlink()
    r = run_tool("tools/checkpoint/convert.py", str(broken), str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "cannot load the model" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x.safetensors").exists()

    r = run_tool("tools/checkpoint/convert.py", str(tmp_path / "nowhere"), str(tmp_path / "y.safetensors"))
    assert r.returncode == 2 and "nowhere" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_merge_two_task_sets_then_train_on_the_union(bible_data, tmp_path):
    from megatron_taskmoe.checkpoint_tools.single_file import read_single_file

    root = bible_data.parent
    data_de, data_fr = _subset_corpus(root, tmp_path, "de"), _subset_corpus(root, tmp_path, "fr")
    run_de, run_fr = _train(data_de, tmp_path / "run_de"), _train(data_fr, tmp_path / "run_fr")
    singles = []
    for run in (run_de, run_fr):
        singles.append(tmp_path / f"{run.parent.name}.safetensors")
        r = run_tool("tools/checkpoint/convert.py", str(run), str(singles[-1]))
        assert r.returncode == 0, r.stderr[-3000:]
    merged_file = tmp_path / "merged.safetensors"
    r = run_tool("tools/checkpoint/merge.py", *map(str, singles), str(merged_file), "--data-dir", str(bible_data))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["pretrain_mt_overrides"] == ["model.overrides.moe.adapters.num_adapters=4"]

    a, b, m = (read_single_file(p) for p in (*singles, merged_file))
    manifest = json.loads((bible_data / "manifest.json").read_text())
    assert m.meta["task_map"] == manifest["task_map"] and m.meta["languages"] == manifest["languages"]
    assert m.model_config().moe.num_tasks == 4 and m.model_config().moe.adapters.num_adapters == 4
    tasks = manifest["task_map"]["tasks"]  # de-en, en-de, en-fr, fr-en
    for side in ("encoder", "decoder"):
        layer = f"{side}.layers.0.mlp"
        down = m.state[f"{layer}.adapters.down_ADH"]
        assert torch.equal(down, torch.cat([a.state[f"{layer}.adapters.down_ADH"], b.state[f"{layer}.adapters.down_ADH"]]))
        table = m.state[f"{layer}.router.task_embedding"]
        for i, name in enumerate(tasks):
            src = a if name in a.meta["task_map"]["tasks"] else b
            assert torch.equal(table[i], src.state[f"{layer}.router.task_embedding"][src.meta["task_map"]["tasks"].index(name)])
        for key in (f"{layer}.experts.local_experts.2.linear_fc1.weight", f"{layer}.router.weight"):
            assert torch.allclose(m.state[key], (a.state[key] + b.state[key]) / 2)
    key = "embedding.word_embeddings.weight"
    assert torch.allclose(m.state[key], (a.state[key] + b.state[key]) / 2)

    # The merged model continues training on the union corpus with pretrain_mt.py.
    merged = tmp_path / "merged"
    r = run_tool("tools/checkpoint/convert.py", str(merged_file), str(merged), "--config", CONFIG)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run_merged"
    _train(bible_data, run, 2, "--set", f"checkpoint.load={merged}", "--set",
           summary["pretrain_mt_overrides"][0])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    assert all(torch.isfinite(torch.tensor(rec["loss"])) for rec in records if rec["kind"] == "train")

    r = run_tool("tools/checkpoint/merge.py", str(singles[0]), str(singles[0]), str(tmp_path / "bad"))
    assert r.returncode == 2 and "in both" in r.stderr and not (tmp_path / "bad").exists()
