"""Task similarity from routing (analysis/similarity.py) on hand-made distributions, average-linkage clustering on a
hand-computed example and the within/across-family summary (tools/analyze_routing.py on a trained run:
tests/integration/test_routing_similarity_tool.py)."""

import math

import numpy as np
import pytest

from megatron_taskmoe.analysis import RoutingStats
from megatron_taskmoe.analysis.routing import LayerRouting
from megatron_taskmoe.analysis.similarity import average_linkage, cluster_tasks, family_overlap, leaf_order, \
    mean_similarity, pairwise_similarity, task_languages, task_similarity


def _layer(name, kind, counts):
    counts = np.asarray(counts, dtype=np.float64)
    return LayerRouting(name=name, kind=kind, counts_GX=counts, tokens_G=counts.sum(axis=1))


# ------------------------------------------------------------------------------------------------ pure functions
@pytest.mark.parametrize("metric", ["js", "cosine"])
def test_identical_is_one_disjoint_is_zero(metric):
    counts = np.array([[3.0, 1.0, 0.0, 0.0], [6.0, 2.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    sim = pairwise_similarity(counts, metric)
    assert sim[0, 1] == pytest.approx(1.0) and sim[1, 0] == pytest.approx(1.0)  # same shares, other scale
    assert sim[0, 2] == 0.0 and sim[1, 2] == 0.0  # no expert in common
    assert np.isnan(sim[3]).all() and np.isnan(sim[:, 3]).all()  # a task never seen
    np.testing.assert_array_equal(np.diag(sim)[:3], 1.0)
    np.testing.assert_allclose(sim, sim.T, equal_nan=True)


def test_jensen_shannon_value_by_hand():
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): JSD = 1/2 log2(4/3) + 1/4 log2(2/3) + 1/4 log2(2)
    jsd = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    sim = pairwise_similarity(np.array([[1.0, 0.0], [0.5, 0.5]]))
    assert sim[0, 1] == pytest.approx(1 - math.sqrt(jsd))
    cos = pairwise_similarity(np.array([[1.0, 0.0], [0.5, 0.5]]), "cosine")
    assert cos[0, 1] == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="metric"):
        pairwise_similarity(np.eye(2), "euclid")
    with pytest.raises(ValueError, match="non-negative"):
        pairwise_similarity(np.array([[1.0, -1.0], [1.0, 0.0]]))


def test_layer_mean_skips_undefined_layers():
    a = np.array([[1.0, 0.2], [0.2, 1.0]])
    b = np.array([[1.0, np.nan], [np.nan, np.nan]])
    got = mean_similarity([a, b], 2)
    np.testing.assert_allclose(got, [[1.0, 0.2], [0.2, 1.0]])
    assert np.isnan(mean_similarity([b], 2)[0, 1])

    stats = RoutingStats(tasks=["x", "y"], layers=[_layer("encoder.layers.0.mlp.router", "experts", [[1, 0], [0, 1]]),
                                                   _layer("encoder.layers.0.mlp.adapters", "adapters",
                                                          [[2, 0], [2, 0]])])
    sims = task_similarity(stats)
    assert sims["experts"][0, 1] == 0.0 and sims["adapters"][0, 1] == 1.0 and sims["overall"][0, 1] == 0.5
    assert list(sims["per_layer"]) == ["encoder.layers.0.mlp.router", "encoder.layers.0.mlp.adapters"]


def test_average_linkage_on_a_hand_example():
    # points 0, 1, 5, 7, 20 on a line: {0,1} at 1, {5,7} at 2, then mean(5, 7, 4, 6) = 5.5, then
    # mean(20, 19, 15, 13) = 16.75 -- the UPGMA merges, in scipy's linkage format.
    x = np.array([0.0, 1.0, 5.0, 7.0, 20.0])
    Z = average_linkage(np.abs(x[:, None] - x[None, :]))
    np.testing.assert_allclose(Z, [[0, 1, 1, 2], [2, 3, 2, 2], [5, 6, 5.5, 4], [4, 7, 16.75, 5]])
    assert leaf_order(Z, 5) == [4, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="not symmetric"):
        average_linkage(np.array([[0.0, 1.0], [2.0, 0.0]]))
    with pytest.raises(ValueError, match="finite"):
        average_linkage(np.array([[0.0, np.nan], [np.nan, 0.0]]))


def test_clustering_groups_the_constructed_families_and_leaves_out_unseen_tasks():
    tasks = ["fr-en", "es-en", "de-en", "nl-en", "xx-en"]
    usage = [[0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0], [0, 0, 0.7, 0.3], [0, 0.1, 0.6, 0.3], [0, 0, 0, 0]]
    stats = RoutingStats(tasks=tasks, layers=[_layer("decoder.layers.0.mlp.router", "experts", usage)])
    sims = task_similarity(stats)
    c = cluster_tasks(sims["overall"], tasks)
    assert c["tasks"] == tasks[:4] and c["left_out"] == ["xx-en"]
    first, second, top = c["linkage"]
    assert {int(first[0]), int(first[1])} == {0, 1} and {int(second[0]), int(second[1])} == {2, 3}
    assert top[3] == 4 and top[2] > max(first[2], second[2])
    assert c["order"] == ["fr-en", "es-en", "de-en", "nl-en"]
    assert c["tree"][2] == pytest.approx(top[2], abs=1e-6)
    assert sorted([c["tree"][0][:2], c["tree"][1][:2]]) == [["de-en", "nl-en"], ["fr-en", "es-en"]]


def test_task_languages():
    assert task_languages("fr-en") == (["fr"], "into")
    assert task_languages("en-fr") == (["fr"], "out of")
    assert task_languages("de-fr") == (["de", "fr"], None)
    assert task_languages("fr") == (["fr"], None)


def test_family_overlap_within_vs_across():
    tasks = ["fr-en", "es-en", "de-en", "en-fr", "en-es", "en-de", "zz-en"]
    experts = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0], [1, 0, 0]]
    stats = RoutingStats(tasks=tasks, layers=[_layer("decoder.layers.0.mlp.router", "experts", experts)])
    got = family_overlap(stats)  # default map: fr es Romance, de Germanic; zz unknown
    assert got["metric"].startswith("1 - Jensen-Shannon")
    # same orientation only: within = (fr-en, es-en) and (en-fr, en-es), both identical -> 1;
    # across = fr-en/de-en, es-en/de-en (disjoint, 0) and en-fr/en-de, en-es/en-de (disjoint, 0)
    assert got["within"] == 1.0 and got["within_pairs"] == 2
    assert got["across"] == 0.0 and got["across_pairs"] == 4 and got["gap"] == 1.0
    assert got["by_kind"]["experts"]["gap"] == 1.0 and got["by_kind"]["adapters"]["within"] is None
    pairs = {(p["a"], p["b"]): p for p in got["per_pair"]}
    assert len(pairs) == 21
    assert pairs[("fr-en", "en-fr")]["relation"] == "same_language" and not pairs[("fr-en", "en-fr")]["compared"]
    assert pairs[("fr-en", "en-de")]["relation"] == "across" and not pairs[("fr-en", "en-de")]["compared"]
    assert pairs[("fr-en", "zz-en")]["relation"] == "unknown" and pairs[("fr-en", "zz-en")]["family_b"] is None
    assert pairs[("fr-en", "zz-en")]["similarity"] == 1.0
    both = family_overlap(stats, same_orientation=False)
    assert both["across_pairs"] == 8 and both["within_pairs"] == 4  # + fr-en/en-es, es-en/en-fr (0), 4 across
    assert both["within"] == 0.5
    custom = family_overlap(stats, {"fr": "A", "es": "B", "de": "A"})
    assert custom["within_pairs"] == 2 and custom["within"] == 0.0  # fr-de now "within", and disjoint
