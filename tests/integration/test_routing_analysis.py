"""Per-task routing statistics of a trained tiny task-MoE and their picture: counts add up to the tokens routed
(top-k per token, every real token once), raw-text and preprocessed batches agree, counters are reset, the JSON
round-trips, the PNG is complete, and evaluate.py writes the same statistics."""

import json

import numpy as np
import pytest
import torch

from megatron_taskmoe.parallel import groups
from megatron_taskmoe.analysis import RoutingStats, bitext_batches, collect_routing_stats, dataset_batches, \
    plot_routing
from megatron_taskmoe.analysis.routing import LayerRouting, row_fractions
from megatron_taskmoe.inference import Translator, TranslatorConfig, load_checkpoint

from tests.helpers import tiny_run

DIRECTIONS = ("de-en", "en-de", "en-fr", "fr-en")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, run_dir = tiny_run.shared_run(tmp_path_factory)
    loaded = load_checkpoint(run_dir, device="cpu")
    yield root, run_dir, loaded
    if torch.distributed.is_initialized():
        groups.destroy()


def corpus_pairs(root, limit=None):
    pairs = {}
    for d in DIRECTIONS:
        src, tgt = d.split("-")
        name = "en-" + (src if tgt == "en" else tgt)
        sources = (root / "raw" / f"test.{name}.{src}").read_text().splitlines()[:limit]
        targets = (root / "raw" / f"test.{name}.{tgt}").read_text().splitlines()[:limit]
        pairs[d] = (sources, targets)
    return pairs


@pytest.fixture(scope="module")
def stats(setup):
    root, _, loaded = setup
    translator = Translator(loaded, TranslatorConfig(batch_size=7))
    return collect_routing_stats(loaded.model, bitext_batches(translator, corpus_pairs(root)),
                                 task_names=loaded.task_map["tasks"])


def test_row_fractions():
    got = row_fractions(np.array([[1.0, 3.0], [0.0, 0.0]]))
    assert got[0].tolist() == [0.25, 0.75] and np.isnan(got[1]).all()


def test_counts_add_up_to_the_routed_tokens(setup, stats):
    root, _, loaded = setup
    moe = loaded.model_config.moe
    translator = Translator(loaded)
    src_tokens, tgt_tokens = np.zeros(4), np.zeros(4)
    for d, (sources, targets) in corpus_pairs(root).items():
        for s in translator.samples(sources, *d.split("-"), targets=targets):
            src_tokens[s["task_id"]] += len(s["src"])
            tgt_tokens[s["task_id"]] += len(s["tgt_in"])
    assert stats.tasks == list(DIRECTIONS)
    moe_layers = loaded.model_config.num_moe_layers()  # every FFN of the shared-dynamic preset, adapters on each
    assert moe_layers == 4 and len(stats.experts()) == moe_layers and len(stats.adapters()) == moe_layers
    for layer in stats.layers:
        want = src_tokens if layer.name.startswith("encoder.") else tgt_tokens
        np.testing.assert_array_equal(layer.tokens_G, want)
        per_token = moe.topk if layer.kind == "experts" else moe.adapters.topk
        width = moe.num_experts if layer.kind == "experts" else 2  # shared_dynamic: ceil(log2(4 tasks)) adapters
        assert layer.counts_GX.shape == (4, width)
        np.testing.assert_array_equal(layer.counts_GX.sum(axis=1), per_token * want)
        np.testing.assert_allclose(np.nansum(layer.load_GX, axis=1), 1.0)


def test_preprocessed_split_gives_the_same_statistics(setup, stats):
    root, _, loaded = setup
    again = collect_routing_stats(loaded.model, dataset_batches(root / "bin", "test",
                                                                model_config=loaded.model_config, max_tokens=256),
                                  task_names=loaded.task_map["tasks"])
    assert [layer.name for layer in again.layers] == [layer.name for layer in stats.layers]
    for a, b in zip(again.layers, stats.layers):
        np.testing.assert_array_equal(a.tokens_G, b.tokens_G)
        # other batch shapes can flip a near-tie of the router's top-k; anything beyond that is a bug
        assert np.abs(a.counts_GX - b.counts_GX).sum() <= 0.01 * b.counts_GX.sum(), a.name


def test_counters_are_reset_and_switched_off(setup, stats):
    root, _, loaded = setup
    translator = Translator(loaded, TranslatorConfig(batch_size=7))
    again = collect_routing_stats(loaded.model, bitext_batches(translator, corpus_pairs(root)),
                                  task_names=loaded.task_map["tasks"])
    for a, b in zip(again.layers, stats.layers):
        np.testing.assert_array_equal(a.counts_GX, b.counts_GX)
    from megatron_taskmoe.model.moe import routing_stats

    assert routing_stats(loaded.model) == {}
    assert not loaded.model.training
    with pytest.raises(ValueError, match="no batches"):
        collect_routing_stats(loaded.model, [], task_names=loaded.task_map["tasks"])
    with pytest.raises(ValueError, match="counts 4 tasks but 3 task names"):
        collect_routing_stats(loaded.model, bitext_batches(translator, corpus_pairs(root, 2)),
                              task_names=["a", "b", "c"])


def test_json_round_trip(stats):
    doc = json.loads(stats.to_json())
    assert doc["layers"][0]["label"] == "encoder layer 1 experts"
    back = RoutingStats.from_dict(doc)
    for a, b in zip(back.layers, stats.layers):
        assert a.name == b.name and a.kind == b.kind
        np.testing.assert_array_equal(a.counts_GX, b.counts_GX)
    with pytest.raises(ValueError, match="not a routing statistics document"):
        RoutingStats.from_dict({"tasks": []})


def test_plot_writes_a_complete_png(stats, tmp_path):
    import matplotlib.image

    path = plot_routing(stats, tmp_path / "sub" / "routing.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 2 * height > 200  # four panels side by side
    assert sorted(p.name for p in path.parent.iterdir()) == ["routing.png"]  # no temporary file left
    with pytest.raises(ValueError, match="no routing statistics"):
        plot_routing(RoutingStats(tasks=["a"]), tmp_path / "empty.png")
    one = RoutingStats(tasks=["a", "b"], layers=[LayerRouting(name="decoder.layers.3.mlp.router", kind="experts",
                                                              counts_GX=np.eye(2), tokens_G=np.ones(2))])
    assert plot_routing(one, tmp_path / "one.png").is_file()
    assert one.layers[0].label == "decoder layer 4 experts"


def test_dense_model_has_nothing_to_count(setup):
    from megatron_taskmoe.model import presets
    from megatron_taskmoe.model.encdec import EncoderDecoderModel

    _, _, loaded = setup
    dense = EncoderDecoderModel(presets.tiny(vocab_size=loaded.model_config.vocab_size))
    batches = bitext_batches(Translator(loaded), {"en-de": (["the dog"], ["der hund"])})
    with pytest.raises(ValueError, match="no task-aware router or adapter"):
        collect_routing_stats(dense, batches, task_names=loaded.task_map["tasks"])


def test_evaluate_writes_the_same_statistics(setup, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(tiny_run.ROOT / "tools"))
    import evaluate

    root, run_dir, loaded = setup
    code = evaluate.main(["--checkpoint", str(run_dir), "--data", str(root / "raw"), "--beam", "1",
                          "--max-sentences", "6", "--routing-json", str(tmp_path / "r.json"), "--routing-png",
                          str(tmp_path / "r.png"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    written = RoutingStats.from_dict(json.loads((tmp_path / "r.json").read_text()))
    want = collect_routing_stats(loaded.model, bitext_batches(Translator(loaded), corpus_pairs(root, 6)),
                                 task_names=loaded.task_map["tasks"])
    for a, b in zip(written.layers, want.layers):
        np.testing.assert_array_equal(a.tokens_G, b.tokens_G)
        np.testing.assert_array_equal(a.counts_GX, b.counts_GX)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    code = evaluate.main(["--checkpoint", str(run_dir), "--checkpoint", str(run_dir), "--system", "a", "--system",
                          "b", "--data", str(root / "raw"), "--routing-png", str(tmp_path / "x.png")])
    assert code == 2 and "need exactly one --checkpoint" in capsys.readouterr().err
