"""Parallel layouts reproduce the single-process model: same losses and gradients within 1e-5 (fp32).

For each layout the tiny model is built in this process (the reference, world size 1) for token routing and for
the paper's shared-dynamic task routing, then the layout runs in gloo processes that load their slices of the
reference weights and check losses and gradients (see `tests/helpers/harness.py`). Data-parallel ranks see their shard of the
batch; the reference runs those shards as accumulated micro-batches, which is what data parallelism computes.
Every FFN is an MoE layer here, so every layer exercises the dispatcher.
"""

from dataclasses import replace

import pytest
import torch

from megatron_taskmoe.model import presets
from megatron_taskmoe.model.config import ParallelConfig

from tests.helpers import harness as H

pytestmark = pytest.mark.distributed

BATCH = dict(batch=4, src_len=8, tgt_len=6)
SYSTEMS = ("moe_token", "moe_task_shared_dynamic")


def model_config(system: str, dispatcher: str = "alltoall"):
    # 250 pieces: the table is padded to 256 rows, so every layout masks padded rows out of the loss.
    cfg = presets.get(system, "tiny", num_tasks=3, num_languages=4, vocab_size=250)
    if cfg.moe is not None:
        moe = replace(cfg.moe, token_dispatcher=dispatcher,
                      encoder=replace(cfg.moe.encoder, layer_freq=1), decoder=replace(cfg.moe.decoder, layer_freq=1))
        cfg = replace(cfg, moe=moe)
    return cfg


def check_layout(tmp_path, model_cfgs, parallel_cfg: ParallelConfig, world_size: int) -> None:
    batch = H.make_batch(model_cfgs[0].vocab_size, **BATCH)
    refs = H.references_in_process(model_cfgs, batch, parallel_cfg.data(world_size))
    items = []
    for i, (cfg, ref) in enumerate(zip(model_cfgs, refs)):
        path = str(tmp_path / f"reference{i}.pt")
        torch.save(ref, path)
        items.append((cfg, path))
    H.spawn(H.run_parallel_and_compare, world_size, items, parallel_cfg, batch, tmp_dir=str(tmp_path))


CASES = {
    "tp2_sp": (ParallelConfig(tensor=2), 2, "alltoall", SYSTEMS + ("dense",)),
    "ep2_alltoall": (ParallelConfig(expert=2), 2, "alltoall", SYSTEMS),
    "ep2_allgather": (ParallelConfig(expert=2), 2, "allgather", SYSTEMS),
    "dp2": (ParallelConfig(), 2, "alltoall", SYSTEMS),
    "tp2_ep2": (ParallelConfig(tensor=2, expert=2), 4, "alltoall", SYSTEMS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_single_process(tmp_path, case):
    parallel_cfg, world, dispatcher, systems = CASES[case]
    check_layout(tmp_path, [model_config(s, dispatcher) for s in systems], parallel_cfg, world)


@pytest.mark.parametrize("case", ["tp2_sp", "ep2_alltoall", "tp2_ep2"])
def test_layout_initialises_the_single_process_weights(tmp_path, case):
    """Same seed, same initial weights under every layout (each rank holds its slice of them)."""
    parallel_cfg, world, dispatcher, systems = CASES[case]
    model_cfgs = [model_config(s, dispatcher) for s in systems]
    refs = H.references_in_process(model_cfgs, H.make_batch(model_cfgs[0].vocab_size, **BATCH), 1)
    items = []
    for i, (cfg, ref) in enumerate(zip(model_cfgs, refs)):
        path = str(tmp_path / f"reference{i}.pt")
        torch.save(ref, path)
        items.append((cfg, path))
    H.spawn(H.check_initialisation, world, items, parallel_cfg, tmp_dir=str(tmp_path))
