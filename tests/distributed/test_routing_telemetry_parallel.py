"""Routing telemetry reduced over parallel ranks equals the single-process run's on the same batches.

The reference is the tiny shared-dynamic task-MoE (every FFN an MoE layer: task-aware routers and dynamic adapter
gates on both sides) in this process at world size 1, counting two micro-batches (the two halves of the batch) in
training mode; the trainer's `RoutingTelemetry.reduce` reads its counters. Then two gloo processes run, one after
the other in the same processes, data parallel (DP=2), expert parallel (EP=2, all-to-all dispatch), tensor
parallel with sequence parallelism (TP=2) and pipeline parallel (PP=2, megatron's 1F1B schedule, encoder | decoder),
each loading the reference weights and seeing the same tokens (a data-parallel rank its half as one micro-batch,
otherwise both halves); their `RoutingTelemetry.reduce` must give the reference's counts of every layer, under the
whole model's layer names (integers exactly, the entropy sums to 1e-6 relative: tensor parallelism computes the
logits in another summation order) and the same record.

Capacity dropping (factor 1.0) is on except under TP=2: there each rank applies the capacity to its S/2 positions
(megatron's rule is per rank), so the drops themselves differ from one process's, not only their counting.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from megatron_taskmoe.analysis.telemetry import routing_record
from megatron_taskmoe.model import presets
from megatron_taskmoe.model.config import ParallelConfig, to_transformer_config
from megatron_taskmoe.parallel import groups
from megatron_taskmoe.parallel import pipeline
from megatron_taskmoe.training.routing_telemetry import RoutingTelemetry

from tests.helpers import harness as H

pytestmark = pytest.mark.distributed

BATCH = dict(batch=8, src_len=9, tgt_len=7)
TASKS = ["t0", "t1", "t2"]
LAYOUTS = {  # name: (parallel config, capacity dropping)
    "dp2": (ParallelConfig(), True),
    "ep2": (ParallelConfig(expert=2), True),
    "tp2": (ParallelConfig(tensor=2), False),
    "pp2": (ParallelConfig(pipeline=2, encoder_pipeline_stages=1), True),
}


def model_config(capacity: bool):
    cfg = presets.get("moe_task_shared_dynamic", "tiny", num_tasks=len(TASKS), num_languages=4)
    moe = replace(cfg.moe, token_dispatcher="alltoall", capacity_factor=1.0 if capacity else None,
                  encoder=replace(cfg.moe.encoder, layer_freq=1), decoder=replace(cfg.moe.decoder, layer_freq=1))
    return replace(cfg, moe=moe)


def halves(batch):
    return H.split_micro_batches(batch, 2)


def reference(model_cfg, batch) -> tuple[dict, dict]:
    """(full state, reduced counts) of the single-process model counting the two halves of `batch`."""
    groups.init_distributed(rank=0, world_size=1)
    try:
        pg = groups.initialize_model_parallel()
        model = H.build_model(model_cfg)
        state = {k: v.detach().clone() for k, v in model.named_parameters()}
        telemetry = RoutingTelemetry(model, pg, task_names=TASKS)
        model.train()
        for mb in halves(batch):
            model(**mb)
        return state, telemetry.reduce()
    finally:
        groups.destroy()


def assert_same_counts(got: dict, want: dict, where: str) -> None:
    assert list(got) == list(want), (where, list(got), list(want))
    for name, entry in want.items():
        assert {k: got[name][k] for k in ("kind", "mode", "topk")} == {k: entry[k] for k in ("kind", "mode", "topk")}
        for key, value in entry["counts"].items():
            rtol = 1e-6 if key == "entropy_sum" else 0.0  # TP computes the logits in another order
            np.testing.assert_allclose(got[name]["counts"][key], value, rtol=rtol, atol=0.0,
                                       err_msg=f"{where}: {name} {key}")


def _run_layout(parallel_cfg: ParallelConfig, model_cfg, state, batch) -> dict:
    pg = groups.initialize_model_parallel(parallel_cfg)
    dp_rank, dp = pg.dp.rank(), pg.dp.size()
    micro = halves(batch) if dp == 1 else [H.shard_batch(batch, dp_rank, dp)]
    groups.model_parallel_manual_seed(1234)
    if parallel_cfg.pipeline == 1:
        model = H.build_model(model_cfg, parallel_cfg)
    else:
        tconfig = to_transformer_config(model_cfg, parallel_cfg, pipeline_dtype=torch.float32,
                                        variable_seq_lengths=False)
        model = pipeline.build_stage(model_cfg, parallel_cfg, pg_collection=pg, transformer_config=tconfig)
    H.load_full_state(model, state)
    telemetry = RoutingTelemetry(model, pg, task_names=TASKS)
    model.train()
    if parallel_cfg.pipeline == 1:
        for mb in micro:
            model(**mb)
    else:
        def forward_step(data_iterator, stage):
            mb = next(data_iterator)
            output = stage(**mb)

            def loss_func(loss_BT):
                loss_sum = (loss_BT * mb["loss_mask"]).sum()
                tokens = mb["loss_mask"].sum().to(torch.int)
                return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}

            return output, loss_func

        pipeline.forward_backward(forward_step_func=forward_step, data_iterator=iter(micro), model=model,
                                  num_microbatches=len(micro), micro_batch_size=micro[0]["src_tokens"].shape[0],
                                  src_len=micro[0]["src_tokens"].shape[1], tgt_len=micro[0]["tgt_input"].shape[1])
    return telemetry.reduce()


def worker(rank, world_size, ref_path, batch):
    from megatron.core import parallel_state

    refs = torch.load(ref_path, weights_only=False)
    for name, (parallel_cfg, capacity) in LAYOUTS.items():
        state, want = refs[capacity]
        got = _run_layout(parallel_cfg, model_config(capacity), state, batch)
        assert_same_counts(got, want, f"rank {rank} {name}")
        record = routing_record(got, TASKS, window_steps=1)
        want_record = routing_record(want, TASKS, window_steps=1)
        for entry in (record, want_record):  # the entropies are compared above, to 1e-6 relative
            for layer in entry["layers"].values():
                layer.pop("entropy", None)
                layer.pop("task_entropy")
        assert record == want_record, name
        parallel_state.destroy_model_parallel()


def test_reduced_routing_statistics_equal_the_single_process_run(tmp_path):
    batch = H.make_batch(model_config(True).vocab_size, num_tasks=len(TASKS), **BATCH)
    refs = {capacity: reference(model_config(capacity), batch) for capacity in (True, False)}
    counts = refs[True][1]
    routed = sum(entry["counts"]["routed_E"].sum() for entry in counts.values() if entry["kind"] == "experts")
    kept = sum(entry["counts"]["assigned_E"].sum() for entry in counts.values() if entry["kind"] == "experts")
    assert kept < routed  # capacity dropped assignments: their counting is compared too
    assert {entry["kind"] for entry in counts.values()} == {"experts", "adapters"}
    assert all(entry["counts"]["task_tokens_G"].sum() > 0 for entry in counts.values())
    path = str(tmp_path / "reference.pt")
    torch.save(refs, path)
    H.spawn(worker, 2, path, batch, tmp_dir=str(tmp_path))
