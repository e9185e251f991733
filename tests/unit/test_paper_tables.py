"""The paper-table benchmark's bookkeeping: which runs it plans, and how per-seed scores become table cells."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pt():
    spec = importlib.util.spec_from_file_location("paper_tables", ROOT / "benchmarks" / "paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def record(label, seed, scores, table="table2"):
    return {"label": label, "seed": seed, "table": table, "bleu": dict(scores), "chrf": dict(scores)}


def test_plan_runs_every_system_once_and_main_systems_per_seed(pt):
    runs = pt.plan(pt.parse_args(["--out", "x"]))
    t2 = [r for r in runs if r.table == "table2"]
    t3 = [r for r in runs if r.table == "table3"]
    assert len(t2) == len(pt.TABLE2) + len(pt.MAIN_SYSTEMS) and len(t3) == len(pt.TABLE3)
    assert {r.system for r in t2 if r.seed == 2} == set(pt.MAIN_SYSTEMS)
    assert all(r.directions == list(pt.ABLATION_DIRECTIONS) for r in t3)
    assert len({r.name for r in runs}) == len(runs)
    with pytest.raises(SystemExit):
        pt.parse_args(["--out", "x", "--systems", "nope"])


def test_run_configs_differ_only_in_system_and_seed(pt):
    scale = pt.SCALES["cpu"]
    a = pt.run_config(pt.Run(table="table2", label="a", system="dense", seed=1), scale, Path("o"))
    b = pt.run_config(pt.Run(table="table2", label="b", system="moe_token", seed=2), scale, Path("o"))
    for cfg in (a, b):
        cfg["model"].pop("system"), cfg["train"].pop("seed"), cfg["train"].pop("run_dir")
    assert a == b


def test_aggregate_averages_per_seed_then_reports_mean_and_std(pt):
    s1 = {"fr-en": 10.0, "es-en": 4.0, "en-fr": 8.0, "en-es": 2.0}
    s2 = {"fr-en": 12.0, "es-en": 6.0, "en-fr": 6.0, "en-es": 2.0}
    cols, table = pt.aggregate([record("X", 2, s2), record("X", 1, s1), record("Y", 1, s1)], "bleu")
    assert cols[:4] == ["es-en", "fr-en", "en-es", "en-fr"]
    assert table["X"]["avg xx-en"] == [7.0, 9.0] and table["X"]["avg en-xx"] == [5.0, 4.0]
    assert table["X"]["avg high"] == [9.0, 9.0] and table["X"]["avg low"] == [3.0, 4.0]  # es is low-resource
    assert pt.cell(table["X"]["avg low"]) == f"3.5 ± {statistics.stdev([3.0, 4.0]):.1f}"
    assert pt.cell(table["Y"]["avg"]) == "6.0"
    md = pt.markdown(cols, table, ["X", "Y", "absent"])
    assert md.count("\n") == 3 and "| Y | 4.0 | 10.0 |" in md


def test_signatures_collects_every_runs_sacrebleu_signatures(pt, tmp_path):
    for name, sig in (("a", "tok:13a"), ("b", "tok:zh")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "scores.json").write_text(json.dumps(
            {"signatures": {"bleu": {sig: ["de-en"]}, "chrf": {"nc:6": ["de-en"]}}}))
    got = pt.signatures(tmp_path, [{"name": "a"}, {"name": "b"}])
    assert got == {"bleu": ["tok:13a", "tok:zh"], "chrf": ["nc:6"]}
