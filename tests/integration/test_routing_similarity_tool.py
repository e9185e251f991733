"""tools/analyze_routing.py on a tiny trained run: the files it writes, a JSON document consistent with the routing
statistics and task similarity (analysis/similarity.py, tested on hand-made distributions in
tests/unit/test_routing_similarity.py), and clean failures on bad input."""

import json

import numpy as np
import pytest
import torch

from megatron_taskmoe.parallel import groups
from megatron_taskmoe.analysis import RoutingStats, collect_routing_stats, dataset_batches
from megatron_taskmoe.analysis.similarity import cluster_tasks, task_similarity

from tests.helpers import tiny_run


# ------------------------------------------------------------------------------------------------ the tool
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root, run_dir = tiny_run.shared_run(tmp_path_factory)
    yield root, run_dir
    if torch.distributed.is_initialized():
        groups.destroy()


def _tool():
    import sys

    sys.path.insert(0, str(tiny_run.ROOT / "tools"))
    import analyze_routing

    return analyze_routing


def test_analyze_routing_writes_consistent_files(trained, tmp_path, capsys):
    root, run_dir = trained
    families = tmp_path / "families.json"
    families.write_text(json.dumps({"de": "Westish", "fr": "Westish", "en": "Pivot"}))
    out = tmp_path / "analysis"
    code = _tool().main(["--checkpoint", str(run_dir), "--data", str(root / "bin"), "--split", "test",
                         "--max-sentences", "10", "--families", str(families), "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "similarity within families" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["routing.json", "routing.png", "similarity.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis", "families.json"]  # no partial left
    for png in ("routing.png", "similarity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "routing.json").read_text())
    assert doc["source"]["directions"] == ["de-en", "en-de", "en-fr", "fr-en"] and doc["source"]["split"] == "test"

    # the counts are what collect_routing_stats gives on the same sentences
    from megatron_taskmoe.inference import load_checkpoint

    loaded = load_checkpoint(run_dir, device="cpu")
    want = collect_routing_stats(loaded.model, dataset_batches(root / "bin", "test", model_config=loaded.model_config,
                                                               max_sentences=10),
                                 task_names=loaded.task_map["tasks"])
    stats = RoutingStats.from_dict(doc["routing"])
    assert [layer.name for layer in stats.layers] == [layer.name for layer in want.layers]
    for a, b in zip(stats.layers, want.layers):
        np.testing.assert_array_equal(a.counts_GX, b.counts_GX)
        assert a.tokens_G.sum() > 0 and (a.tokens_G <= 10 * 96).all()  # 10 sentences per task

    # the analysis is a function of those counts
    sims = task_similarity(stats)
    np.testing.assert_allclose(np.array(doc["similarity"]["overall"], dtype=float), sims["overall"])
    for name, m in doc["similarity"]["per_layer"].items():
        np.testing.assert_allclose(np.array(m, dtype=float), sims["per_layer"][name])
    assert doc["clustering"] == json.loads(json.dumps(cluster_tasks(sims["overall"], stats.tasks)))
    assert sorted(doc["clustering"]["order"]) == sorted(stats.tasks)
    fam = doc["families"]
    assert fam["map"]["de"] == "Westish"
    assert fam["within_pairs"] == 2 and fam["across_pairs"] == 0  # de-en/fr-en and en-de/en-fr
    pair = next(p for p in fam["per_pair"] if {p["a"], p["b"]} == {"de-en", "fr-en"})
    i, j = stats.tasks.index("de-en"), stats.tasks.index("fr-en")
    assert pair["similarity"] == pytest.approx(sims["overall"][i, j])
    within = [p["similarity"] for p in fam["per_pair"] if p["compared"] and p["relation"] == "within"]
    assert fam["within"] == pytest.approx(np.mean(within))


def test_analyze_routing_raw_text_and_bad_input(trained, tmp_path, capsys):
    root, run_dir = trained
    tool = _tool()
    out = tmp_path / "raw"
    code = tool.main(["--checkpoint", str(run_dir), "--data", str(root / "raw"), "--max-sentences", "4",
                      "--directions", "de-en", "fr-en", "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "routing.json").read_text())
    assert doc["clustering"]["tasks"] == ["de-en", "fr-en"]  # en-de / en-fr were not run: left out
    assert doc["clustering"]["left_out"] == ["en-de", "en-fr"]
    assert doc["families"]["across_pairs"] == 1  # default map: de Germanic, fr Romance

    def fails(*argv, match):
        code = tool.main(["--checkpoint", str(run_dir), "--device", "cpu", *argv])
        err = capsys.readouterr().err
        assert code == 2 and match in err, err

    fails("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1"), match=str(tmp_path / "nowhere"))
    fails("--data", str(root / "raw"), "--out", str(out), match=f"{out}: already exists")
    bad = tmp_path / "fam.json"
    bad.write_text("[1, 2]")
    fails("--data", str(root / "raw"), "--families", str(bad), "--out", str(tmp_path / "o2"), match=str(bad))
    fails("--data", str(root / "raw"), "--directions", "en-xx", "--out", str(tmp_path / "o3"), match="en-xx")
    code = tool.main(["--checkpoint", str(tmp_path / "nockpt"), "--data", str(root / "raw"), "--out",
                      str(tmp_path / "o4")])
    assert code == 2 and "nockpt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam.json", "raw"]  # nothing half-written
