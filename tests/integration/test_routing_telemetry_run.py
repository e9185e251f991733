"""Routing telemetry of a tiny training run (`pretrain_mt.py` in a subprocess, see tiny_run.py): the `routing`
records in metrics.jsonl (one per log interval, summed over two micro-batches per step, token counts equal to the
real tokens of the batches the trainer drew), the TensorBoard scalars and histograms, the collapse warnings in the
log, the switch that turns it off, and `tools/analyze_routing.py --metrics` on the run's logs alone."""

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_taskmoe.analysis.telemetry import read_routing_records
from megatron_taskmoe.config_io import from_dict, load_config, load_yaml
from megatron_taskmoe.data.batching import BatchIterator
from megatron_taskmoe.data.dataset import MultilingualDataset
from megatron_taskmoe.model.config import ModelConfig
from megatron_taskmoe.training.config import RunConfig

from tests.helpers import tiny_run

STEPS, LOG_INTERVAL, MICRO_BATCHES = 6, 3, 2
RUN = dict(steps=STEPS, overrides=(
    f"train.log_interval={LOG_INTERVAL}", f"train.micro_batches={MICRO_BATCHES}", "eval.interval=0",
    "checkpoint.save=false", "model.overrides.moe.capacity_factor=1.0",
    "train.routing_collapse_share=0.3"))  # top-2 of 4 experts: some expert always takes >= 30%, so it "collapses"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("telemetry")
    return root, tiny_run.tiny_run(root, **RUN)


def expected_tokens(run_dir, windows) -> list[tuple[dict, dict]]:
    """Per window of steps: real (source, target) tokens per task of the micro-batches the trainer drew."""
    cfg = load_config(RunConfig, run_dir / "config.yaml")
    model_cfg = from_dict(ModelConfig, load_yaml(run_dir / "model.yaml"))
    manifest = json.loads((Path(cfg.data.data_dir) / "manifest.json").read_text())
    tasks = manifest["task_map"]["tasks"]
    data = MultilingualDataset(cfg.data.data_dir, "train", sorted(manifest["directions"]),
                               max_src_len=model_cfg.max_source_positions - 2,
                               max_tgt_len=model_cfg.max_target_positions - 1)
    batches = BatchIterator(data, temperature=cfg.data.temperature, batching=cfg.data.batching, seed=cfg.train.seed)
    out = []
    for steps in windows:
        src, tgt = {}, {}
        for _ in range(steps * MICRO_BATCHES):
            batch = next(batches)
            for b, task in enumerate(batch["task_ids"].tolist()):
                name = tasks[task]
                src[name] = src.get(name, 0) + int((~batch["src_padding_mask"][b]).sum())
                tgt[name] = tgt.get(name, 0) + int((~batch["tgt_padding_mask"][b]).sum())
        out.append((src, tgt))
    return out


def test_routing_records_count_every_micro_batch_of_the_window(run):
    _, run_dir = run
    records = read_routing_records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6] and [r["window_steps"] for r in records] == [3, 3]
    want = expected_tokens(run_dir, [r["window_steps"] for r in records])
    for record, (src, tgt) in zip(records, want):
        layers = record["layers"]
        kinds = {(name.split(".")[0], entry["kind"]) for name, entry in layers.items()}
        assert kinds == {("encoder", "experts"), ("encoder", "adapters"), ("decoder", "experts"),
                         ("decoder", "adapters")}
        for name, entry in layers.items():
            assert entry["task_tokens"] == (src if name.startswith("encoder") else tgt), name
            assert entry["tokens"] == sum(entry["task_tokens"].values())
            assert sum(entry["share"]) == pytest.approx(1.0, abs=1e-5)
            for share in entry["task_share"].values():
                assert sum(share) == pytest.approx(1.0, abs=1e-5)
            if entry["kind"] == "experts":
                assert len(entry["share"]) == 4 and entry["mode"] == "task_token" and entry["topk"] == 2
                assert 1.0 <= entry["load_ratio"] <= 4.0 and entry["demand_load_ratio"] >= 1.0
                assert 0.0 < entry["entropy"] <= math.log(4) + 1e-6
                assert 0.0 <= entry["dropped_tokens_fraction"] <= entry["dropped_fraction"] < 1.0
                assert all(0.0 <= h <= math.log(4) + 1e-6 for h in entry["task_entropy"].values())
            else:
                assert entry["mode"] == "shared_dynamic" and len(entry["share"]) == 2
        ratios = sorted(e["load_ratio"] for e in layers.values() if e["kind"] == "experts")
        assert ratios[0] <= record["load_ratio_p50"] <= record["load_ratio_p95"] <= record["load_ratio_max"]
        assert record["load_ratio_max"] == ratios[-1]
    # capacity factor 1.0 drops some assignments somewhere in the run
    assert any(e.get("dropped_fraction", 0) > 0 for r in records for e in r["layers"].values())


def test_collapse_warnings_name_the_layer_once(run):
    _, run_dir = run
    first, second = read_routing_records(run_dir / "metrics.jsonl")
    routers = [n for n, e in first["layers"].items() if e["kind"] == "experts"]
    assert set(routers) <= set(first["collapsed"])  # every router "collapsed" at the 0.3 threshold
    log = (run_dir / "train.log").read_text()
    for name in routers:
        label = first["layers"][name]["label"]
        assert f"WARNING megatron_taskmoe.training.routing_telemetry: routing collapse at step 3: {label} ({name})" \
            in log
        assert log.count(f"({name}) sends") == 1  # still collapsed at step 6: not repeated
    assert len(first["warnings"]) == len(first["collapsed"]) and second["warnings"] == []


def test_tensorboard_gets_routing_scalars_and_histograms(run):
    _, run_dir = run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars, histograms = events.Tags()["scalars"], events.Tags()["histograms"]
    assert {"routing/load_ratio_p50", "routing/load_ratio_p95", "routing/encoder_layer_1_experts/entropy",
            "routing/decoder_layer_1_experts/dropped_fraction"} <= set(scalars)
    assert [e.step for e in events.Scalars("routing/load_ratio_p95")] == [3, 6]
    (last,) = [h for h in events.Histograms("routing/encoder_layer_1_experts/load") if h.step == 6]
    record = read_routing_records(run_dir / "metrics.jsonl")[-1]
    entry = record["layers"]["encoder.layers.0.mlp.router"]
    assert [c / last.histogram_value.num for c in last.histogram_value.bucket] == pytest.approx(entry["share"],
                                                                                                 abs=1e-6)
    assert any(tag.startswith("routing/decoder_layer_1_adapters/task/") for tag in histograms)


def test_routing_stats_switch_turns_it_off(tmp_path_factory):
    root = tmp_path_factory.mktemp("telemetry_off")
    run_dir = tiny_run.tiny_run(root, steps=2, overrides=("train.log_interval=1", "train.routing_stats=false",
                                                          "eval.interval=0", "checkpoint.save=false"))
    kinds = [r["kind"] for r in tiny_run.metrics(run_dir)]
    assert kinds == ["train", "train"]
    code = _tool().main(["--metrics", str(run_dir), "--out", str(root / "analysis")])
    assert code == 2 and not (root / "analysis").exists()


def _tool():
    import sys

    sys.path.insert(0, str(tiny_run.ROOT / "tools"))
    import analyze_routing

    return analyze_routing


def test_analyze_routing_from_the_logs_alone(run, tmp_path, capsys):
    _, run_dir = run
    families = tmp_path / "families.json"
    families.write_text(json.dumps({"de": "Westish", "fr": "Westish"}))  # de-en/fr-en, en-de/en-fr: within pairs
    out = tmp_path / "analysis"
    code = _tool().main(["--metrics", str(run_dir / "metrics.jsonl"), "--families", str(families), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "2 routing records, steps 3-6" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapters.png", "families.png", "load.png", "routing.png", "telemetry.json"]
    for png in names[:-1]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "telemetry.json").read_text())
    records = read_routing_records(run_dir / "metrics.jsonl")
    assert doc["series"]["steps"] == [3, 6] and len(doc["families"]) == 2
    assert doc["families"][0]["within_pairs"] == 2 and doc["families"][0]["across_pairs"] == 0
    name = "decoder.layers.0.mlp.router"
    assert doc["series"]["layers"][name]["load_ratio"] == [r["layers"][name]["load_ratio"] for r in records]
    assert doc["warnings"] == records[0]["warnings"]


def test_analyze_routing_metrics_bad_input(run, tmp_path, capsys):
    _, run_dir = run
    tool = _tool()

    def fails(*argv, match):
        code = tool.main([*argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and match in err, err

    fails("--metrics", str(tmp_path / "none.jsonl"), match=f"{tmp_path / 'none.jsonl'}: no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text((run_dir / "metrics.jsonl").read_text() + "{oops\n")
    fails("--metrics", str(bad), match=f"{bad}:")
    fails("--checkpoint", str(run_dir), match="--data is required with --checkpoint")
    with pytest.raises(SystemExit) as both:
        tool.main(["--metrics", str(bad), "--checkpoint", str(run_dir), "--out", str(tmp_path / "o")])
    assert both.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written
