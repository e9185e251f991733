"""Routing telemetry, without process groups: the statistics of a `routing` record (pure functions), the on-device
counting of routers and adapter gates (training forwards only, apart from the validation counts), reading records
back, and the TensorBoard histograms.

Legend: S length, B batch, D model dim, T = S*B tokens, E experts, A adapters, G tasks.
"""

import math

import numpy as np
import pytest
import torch

from megatron_taskmoe.analysis.similarity import family_overlap
from megatron_taskmoe.analysis.telemetry import (TelemetryError, adapter_collapse, collapse_changes, dropped_fraction,
                                                 empty_count, entropy, expert_collapse, load_ratio, percentiles,
                                                 read_routing_records, record_routing_stats, routing_record, shares)
from megatron_taskmoe.model import routing as R
from megatron_taskmoe.model.moe import pack_routing_stats, unpack_routing_stats
from megatron_taskmoe.model.routing_counts import ADAPTER_KEYS, ROUTER_KEYS, router_counts
from megatron_taskmoe.training.metrics import MetricsWriter
from megatron_taskmoe.training.routing_telemetry import tensorboard_items

from tests.helpers.tiny_adapters import h_input
from tests.helpers.tiny_adapters import make as make_adapters
from tests.helpers.tiny_router import TASKS, inputs, make_router


# ------------------------------------------------------------------------------------------------ statistics
def test_load_ratio_shares_entropy_and_percentiles():
    assert load_ratio([10, 10, 10, 10]) == 1.0
    assert load_ratio([40, 0, 0, 0]) == 4.0  # everything on one of 4 experts
    assert load_ratio([30, 10, 0, 0]) == pytest.approx(3.0)
    assert load_ratio([0, 0]) is None
    np.testing.assert_allclose(shares([1, 3]), [0.25, 0.75])
    np.testing.assert_array_equal(shares([0, 0]), [0.0, 0.0])
    assert entropy([5, 5, 5, 5]) == pytest.approx(math.log(4))
    assert entropy([0, 7, 0]) == 0.0 and math.copysign(1.0, entropy([0, 7, 0])) == 1.0
    assert entropy([1, 3]) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert entropy([0, 0]) is None
    p50, p95 = percentiles([1.0, 2.0, None, 3.0, 5.0])
    assert p50 == pytest.approx(2.5) and p95 == pytest.approx(3.0 + 0.85 * 2.0)  # linear interpolation
    assert percentiles([None]) == [None, None]


def test_drops_and_empty_experts():
    assert dropped_fraction(kept=75, routed=100) == 0.25
    assert dropped_fraction(kept=0, routed=0) is None
    assert empty_count([3, 0, 1, 0]) == 2


def test_expert_collapse_is_judged_on_the_routers_choice():
    # top-1, 100 tokens: 95 chose expert 2
    assert expert_collapse([2, 1, 95, 2], tokens=100, topk=1, threshold=0.9) == (2, 0.95)
    assert expert_collapse([30, 20, 30, 20], tokens=100, topk=1, threshold=0.9) is None
    # top-2 counts a token once per chosen expert: expert 0 in every token's pair is a collapse
    assert expert_collapse([100, 40, 30, 30], tokens=100, topk=2, threshold=0.9) == (0, 1.0)
    # top-k = E: every expert takes every token by construction
    assert expert_collapse([100, 100], tokens=100, topk=2, threshold=0.9) is None
    assert expert_collapse([0, 0, 0], tokens=0, topk=1, threshold=0.9) is None


def test_adapter_collapse_needs_every_task_on_one_adapter():
    tokens_G = np.array([10.0, 20.0, 0.0])  # task 2 unseen
    one_adapter_GA = np.array([[0, 10, 0], [1, 19, 0], [0, 0, 0]])
    assert adapter_collapse(one_adapter_GA, tokens_G, topk=1, threshold=0.9) == (1, 0.95)
    split_GA = np.array([[10, 0, 0], [0, 20, 0], [0, 0, 0]])  # each task on its own adapter: specialised, fine
    assert adapter_collapse(split_GA, tokens_G, topk=1, threshold=0.9) is None
    assert adapter_collapse(one_adapter_GA[:1], tokens_G[:1], topk=1, threshold=0.9) is None  # one task only
    assert adapter_collapse(np.array([[10, 10], [20, 20]]), tokens_G[:2], topk=2, threshold=0.9) is None  # k = A


# ------------------------------------------------------------------------------------------------ counting
@pytest.mark.parametrize("pad_to_capacity", [False, True])
def test_router_counts_equal_a_token_by_token_count(pad_to_capacity):
    g = torch.Generator().manual_seed(3)
    T, E = 40, 4
    logits_TE = torch.randn(T, E, generator=g) * 2
    valid_T = torch.rand(T, generator=g) > 0.2
    probs_TE, routed_TE = R.topk_routing(logits_TE, 2)
    _, kept_TE = R.drop_over_capacity(probs_TE, routed_TE, capacity=6, pad_to_capacity=pad_to_capacity,
                                      valid_T=valid_T)
    got = router_counts(logits_TE, routed_TE, kept_TE, valid_T)
    assigned, routed, dropped, h = np.zeros(E), np.zeros(E), 0, 0.0
    p_TE = torch.softmax(logits_TE.double(), -1).numpy()
    for t in range(T):
        if not valid_T[t]:
            continue
        kept_any = False
        for e in range(E):
            routed[e] += bool(routed_TE[t, e])
            if routed_TE[t, e] and kept_TE[t, e]:
                assigned[e] += 1
                kept_any = True
        dropped += not kept_any
        h -= float((p_TE[t] * np.log(p_TE[t])).sum())
    np.testing.assert_array_equal(got["assigned_E"].numpy(), assigned)
    np.testing.assert_array_equal(got["routed_E"].numpy(), routed)
    assert float(got["tokens"]) == float(valid_T.sum()) and float(got["dropped_tokens"]) == dropped
    assert assigned.sum() < routed.sum() and dropped > 0  # the capacity dropped something
    assert float(got["entropy_sum"]) == pytest.approx(h, rel=1e-6)
    dropless = router_counts(logits_TE, routed_TE, routed_TE, valid_T)  # the same map: nothing dropped
    assert float(dropless["dropped_tokens"]) == 0 and torch.equal(dropless["assigned_E"], dropless["routed_E"])


def test_router_counts_in_training_forwards_only_and_apart_from_validation_counts():
    router, ctx = make_router("task_token", capacity_factor=1.0)
    router.init_telemetry(torch.device("cpu"))
    router.collect_stats = True
    router.init_stats(torch.device("cpu"))
    x_SBD, pad_BS = inputs()
    with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
        router.train()
        router(x_SBD)
        router(x_SBD)  # two micro-batches
        counts = {k: v.clone() for k, v in router.telemetry.values.items()}
        router.eval()
        router(x_SBD)  # validation: not telemetry
        router.train()
        with torch.no_grad():
            router(x_SBD)  # no grad (e.g. a forward-only schedule): not telemetry
    assert sorted(counts) == sorted(ROUTER_KEYS)
    for key, value in router.telemetry.values.items():
        assert torch.equal(value, counts[key]), key
    real = int((~pad_BS).sum())
    assert counts["tokens"].item() == 2 * real
    expected_G = torch.zeros(3, dtype=torch.float64).index_add_(0, TASKS, (~pad_BS).sum(1).double())
    torch.testing.assert_close(counts["task_tokens_G"], 2 * expected_G)
    torch.testing.assert_close(counts["task_assigned_GE"].sum(0), counts["assigned_E"])
    assert counts["routed_E"].sum().item() == 2 * 2 * real  # top-2, before dropping
    assert counts["assigned_E"].sum() <= counts["routed_E"].sum()
    # the validation counts saw all four forwards (their switch is independent)
    torch.testing.assert_close(router.stats_tokens_G, 4 * expected_G)
    router.telemetry.zero_()
    assert all(not v.any() for v in router.telemetry.values.values())


def test_dynamic_adapter_telemetry_counts_each_tasks_gate_choices():
    adapters, _, ctx = make_adapters("dynamic", topk=1)
    adapters.init_telemetry(torch.device("cpu"))
    pad_BS = torch.zeros(4, 5, dtype=torch.bool)
    pad_BS[2, 3:] = True
    from tests.helpers.tiny_adapters import TASKS as ADAPTER_TASKS

    with ctx.micro_batch(task_ids_B=ADAPTER_TASKS, tgt_padding_mask_BT=pad_BS):
        adapters.train()
        adapters(h_input(), pad_BS.T)
        adapters.eval()
        adapters(h_input(), pad_BS.T)
    values = adapters.telemetry.values
    assert sorted(values) == sorted(ADAPTER_KEYS)
    expected_G = torch.zeros(6, dtype=torch.float64).index_add_(0, ADAPTER_TASKS, (~pad_BS).sum(1).double())
    torch.testing.assert_close(values["task_tokens_G"], expected_G)  # the eval forward did not count
    torch.testing.assert_close(values["task_assigned_GA"].sum(1), expected_G)  # top-1: one adapter per token


def test_pack_and_unpack_routing_stats():
    stats = {"b": {"y": torch.arange(6.0).reshape(2, 3), "x": torch.tensor([7.0])}, "a": {"z": torch.ones(2)}}
    flat, layout = pack_routing_stats(stats)
    assert [(n, k) for n, k, _ in layout] == [("a", "z"), ("b", "x"), ("b", "y")] and flat.numel() == 9
    back = unpack_routing_stats(flat.numpy(), layout)
    np.testing.assert_array_equal(back["b"]["y"], stats["b"]["y"].numpy())
    assert pack_routing_stats({})[0].numel() == 0


# ------------------------------------------------------------------------------------------------ the record
TASK_NAMES = ["fr-en", "es-en", "de-en"]


def _expert_counts(assigned_E, routed_E, task_assigned_GE, dropped=0.0, entropy_sum=1.0):
    task_assigned_GE = np.asarray(task_assigned_GE, dtype=np.float64)
    tokens_G = task_assigned_GE.sum(1)  # top-1 and nothing dropped in these examples: one assignment per token
    return {"assigned_E": np.asarray(assigned_E, float), "routed_E": np.asarray(routed_E, float),
            "tokens": np.array([tokens_G.sum()]), "dropped_tokens": np.array([dropped]),
            "entropy_sum": np.array([entropy_sum]), "task_assigned_GE": task_assigned_GE, "task_tokens_G": tokens_G}


def _layers():
    balanced = [[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 0, 0]]
    skewed = [[20, 0, 0, 0], [18, 2, 0, 0], [0, 0, 0, 0]]
    return {
        "encoder.layers.0.mlp.router": {"kind": "experts", "mode": "token", "topk": 1,
                                        "counts": _expert_counts([10, 10, 10, 10], [10, 10, 10, 10], balanced,
                                                                 entropy_sum=40 * math.log(4))},
        "decoder.layers.1.mlp.router": {"kind": "experts", "mode": "task", "topk": 1,
                                        "counts": _expert_counts([38, 2, 0, 0], [38, 2, 0, 0], skewed)},
        "decoder.layers.1.mlp.adapters": {"kind": "adapters", "mode": "dynamic", "topk": 1, "counts": {
            "task_assigned_GA": np.array([[0.0, 20.0], [1.0, 19.0], [0.0, 0.0]]),
            "task_tokens_G": np.array([20.0, 20.0, 0.0])}},
    }


def test_routing_record_summarises_every_layer():
    record = routing_record(_layers(), TASK_NAMES, window_steps=10, collapse_share=0.9)
    enc, dec, ada = (record["layers"][n] for n in ("encoder.layers.0.mlp.router", "decoder.layers.1.mlp.router",
                                                  "decoder.layers.1.mlp.adapters"))
    assert enc["label"] == "encoder layer 1 experts" and enc["tokens"] == 40 and enc["share"] == [0.25] * 4
    assert enc["load_ratio"] == 1.0 and enc["empty_experts"] == 0 and enc["entropy"] == round(math.log(4), 6)
    assert enc["dropped_fraction"] == 0.0 and not enc["collapsed"]
    assert set(enc["task_share"]) == {"fr-en", "es-en"}  # de-en had no token in the window
    assert enc["task_entropy"]["fr-en"] == round(math.log(4), 6)
    assert dec["load_ratio"] == pytest.approx(3.8) and dec["empty_experts"] == 2
    assert dec["collapsed"] and dec["collapse"] == {"choice": 0, "fraction": 0.95}
    assert dec["task_entropy"]["fr-en"] == 0.0 and dec["task_share"]["es-en"] == [0.9, 0.1, 0.0, 0.0]
    assert ada["share"] == [0.025, 0.975] and ada["collapsed"] and ada["collapse"]["choice"] == 1
    assert record["load_ratio_p50"] == pytest.approx(2.4) and record["load_ratio_max"] == pytest.approx(3.8)
    assert record["load_ratio_p95"] == pytest.approx(1.0 + 0.95 * 2.8)
    assert record["empty_experts"] == 2 and record["dropped_fraction"] == 0.0 and record["window_steps"] == 10
    assert record["collapsed"] == ["decoder.layers.1.mlp.router", "decoder.layers.1.mlp.adapters"]


def test_collapse_warnings_name_the_layer_once():
    record = routing_record(_layers(), TASK_NAMES, window_steps=10)
    warnings, recovered = collapse_changes(record, set(), step=30)
    assert len(warnings) == 2 and recovered == []
    assert "decoder layer 2 experts (decoder.layers.1.mlp.router)" in warnings[0] and "expert 0 of 4" in warnings[0]
    assert "step 30" in warnings[0] and "95%" in warnings[0]
    assert "adapter gate sends every task to adapter 1 of 2" in warnings[1]
    again, _ = collapse_changes(record, set(record["collapsed"]), step=40)
    assert again == []  # still collapsed: said once
    healthy = routing_record(_layers(), TASK_NAMES, window_steps=10, collapse_share=1.0)
    _, recovered = collapse_changes(healthy, set(record["collapsed"]), step=50)
    assert recovered == ["decoder.layers.1.mlp.adapters", "decoder.layers.1.mlp.router"]


def test_records_read_back_as_routing_stats_for_the_family_analysis(tmp_path):
    layers = _layers()
    # fr-en and es-en (Romance) route alike, de-en (Germanic) elsewhere
    layers["encoder.layers.0.mlp.router"]["counts"] = _expert_counts(
        [20, 20, 10, 10], [20, 20, 10, 10], [[9, 8, 2, 1], [10, 9, 1, 0], [1, 3, 7, 9]])
    record = routing_record(layers, TASK_NAMES, window_steps=5)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write("train", 5, loss=1.0)
    writer.write("routing", 5, **record)
    writer.close()
    (back,) = read_routing_records(tmp_path / "metrics.jsonl")
    stats = record_routing_stats(back, kind="experts")
    assert [layer.name for layer in stats.layers] == ["encoder.layers.0.mlp.router", "decoder.layers.1.mlp.router"]
    np.testing.assert_allclose(stats.layers[0].counts_GX[2], [1, 3, 7, 9])
    overlap = family_overlap(routing_record_stats_one_layer(back), {"fr": "Romance", "es": "Romance",
                                                                    "de": "Germanic"})
    assert overlap["within"] > overlap["across"]
    (tmp_path / "bad.jsonl").write_text('{"kind": "train", "step": 1}\n{not json\n')
    with pytest.raises(TelemetryError, match=r"bad.jsonl:2: not a JSON line"):
        read_routing_records(tmp_path / "bad.jsonl")
    with pytest.raises(TelemetryError, match="missing.jsonl"):
        read_routing_records(tmp_path / "missing.jsonl")


def routing_record_stats_one_layer(record):
    stats = record_routing_stats(record, kind="experts")
    stats.layers = stats.layers[:1]
    return stats


def test_tensorboard_scalars_and_per_expert_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    layers = _layers()
    record = routing_record(layers, TASK_NAMES, window_steps=10)
    scalars, histograms = tensorboard_items(record, layers)
    assert scalars["routing/decoder_layer_2_experts/load_ratio"] == pytest.approx(3.8)
    assert scalars["routing/encoder_layer_1_experts/task_entropy/fr-en"] == round(math.log(4), 6)
    assert histograms["routing/decoder_layer_2_experts/load"] == [38.0, 2.0, 0.0, 0.0]
    assert histograms["routing/decoder_layer_2_adapters/task/es-en"] == [1.0, 19.0]
    writer = MetricsWriter(tmp_path)
    writer.write("routing", 10, tb_scalars=scalars, tb_histograms=histograms, **record)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    assert "routing/load_ratio_p95" in events.Tags()["scalars"]
    assert not any(tag.startswith("routing/layers") for tag in events.Tags()["scalars"])  # only the named scalars
    (hist,) = events.Histograms("routing/decoder_layer_2_experts/load")
    assert hist.step == 10 and hist.histogram_value.num == 40 and list(hist.histogram_value.bucket) == [38, 2, 0, 0]
