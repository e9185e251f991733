"""Pipeline-parallel encoder-decoder reproduces the single-process model: same losses and gradients within 1e-5.

The tiny model (2 encoder + 2 decoder layers, every FFN an MoE layer) runs several micro-batches through
megatron's 1F1B schedule (`parallel/pipeline.py`; with warm-up and cool-down, since micro-batches >= stages) on
every layout below; the reference is the whole model in this process, running the same micro-batches with
gradient accumulation (`tests/helpers/harness.py`: `run_reference`). Per-token losses are compared on the last stage, and every
parameter's gradient on every stage after megatron's `finalize_model_grads` (data-parallel reduction and the
tied-embedding all-reduce across the first encoder, first decoder and last stages).

Layouts, for token routing and shared-dynamic task routing: PP=2 (encoder | decoder) with static shapes, and
PP=2 x EP=2 with micro-batches of different source/target lengths (`variable_seq_lengths`). For shared-dynamic task
routing also PP=2 x TP=2 (sequence parallel) and PP=4 (2 encoder + 2 decoder stages, which carries the encoder
output through an inner decoder stage), both with variable lengths.
"""

from dataclasses import replace

import pytest
import torch

from megatron_taskmoe.model import presets
from megatron_taskmoe.model.config import ParallelConfig, to_transformer_config
from megatron_taskmoe.parallel import groups
from megatron_taskmoe.parallel import pipeline

from tests.helpers import harness as H

pytestmark = pytest.mark.distributed

SYSTEMS = ("moe_token", "moe_task_shared_dynamic")
BATCH = dict(batch=8, src_len=9, tgt_len=7)
MICRO_BATCHES = 4


def model_config(system: str):
    cfg = presets.get(system, "tiny", num_tasks=3, num_languages=4)
    moe = replace(cfg.moe, token_dispatcher="alltoall",
                  encoder=replace(cfg.moe.encoder, layer_freq=1), decoder=replace(cfg.moe.decoder, layer_freq=1))
    return replace(cfg, moe=moe)


def run_pipeline_and_compare(rank, world_size, items, parallel_cfg, batch, variable: bool, seed: int = 1234):
    """Worker: build this rank's stage, load the reference weights, run one 1F1B step, compare."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    pg = groups.initialize_model_parallel(parallel_cfg)
    dp_rank, dp = pg.dp.rank(), pg.dp.size()
    micro = H.split_micro_batches(H.shard_batch(batch, dp_rank, dp), MICRO_BATCHES, trim=variable)
    shapes = {} if variable else dict(micro_batch_size=micro[0]["src_tokens"].shape[0],
                                      src_len=micro[0]["src_tokens"].shape[1], tgt_len=micro[0]["tgt_input"].shape[1])
    for model_cfg, ref_path in items:
        ref: H.Reference = torch.load(ref_path, weights_only=False)
        groups.model_parallel_manual_seed(seed)
        tconfig = to_transformer_config(model_cfg, parallel_cfg, pipeline_dtype=torch.float32,
                                        variable_seq_lengths=variable)
        stage = pipeline.build_stage(model_cfg, parallel_cfg, pg_collection=pg, transformer_config=tconfig)
        H.load_full_state(stage, ref.state)
        ddp = DistributedDataParallel(
            config=stage.config,
            ddp_config=DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False),
            module=stage,
        )
        stage.config.finalize_model_grads_func = finalize_model_grads
        stage.config.no_sync_func = ddp.no_sync
        ddp.zero_grad_buffer()
        seen = []

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            output = model(**mb)

            def loss_func(loss_BT):
                seen.append(loss_BT.detach().clone())
                loss_sum = (loss_BT * mb["loss_mask"]).sum()
                tokens = mb["loss_mask"].sum().to(torch.int)
                return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}

            return output, loss_func

        reported = pipeline.forward_backward(forward_step_func=forward_step, data_iterator=iter(micro), model=ddp,
                                             num_microbatches=MICRO_BATCHES, **shapes)
        if stage.layout.post_process:
            assert len(seen) == len(reported) == MICRO_BATCHES
            for got, want in zip(seen, ref.micro_losses[dp_rank]):
                torch.testing.assert_close(got, want, atol=H.TOL, rtol=H.TOL)
        else:
            assert seen == [] and reported == []
        full_grads = {k: torch.zeros_like(v) for k, v in ref.state.items()} | ref.grads
        checked = 0
        for name, param, full_grad in H.named_full_slices(stage, full_grads):
            torch.testing.assert_close(param.main_grad, full_grad, atol=H.TOL, rtol=H.TOL,
                                       msg=lambda m, n=name: f"rank {rank} stage {stage.layout.stage} grad of {n}: {m}")
            checked += 1
        assert checked == len(list(stage.parameters())) > 0


CASES = {
    # name: (parallel config, world size, micro-batches of different lengths, systems)
    "pp2_static": (ParallelConfig(pipeline=2, encoder_pipeline_stages=1), 2, False, SYSTEMS),
    "pp2_ep2_variable": (ParallelConfig(pipeline=2, expert=2, encoder_pipeline_stages=1), 4, True, SYSTEMS),
    # Beyond the list; the task-routing system only, to keep the file's runtime down.
    "pp2_tp2_variable": (ParallelConfig(pipeline=2, tensor=2, encoder_pipeline_stages=1), 4, True, SYSTEMS[1:]),
    "pp4_variable": (ParallelConfig(pipeline=4, encoder_pipeline_stages=2), 4, True, SYSTEMS[1:]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_single_process(tmp_path, case):
    parallel_cfg, world, variable, systems = CASES[case]
    cfgs = [model_config(s) for s in systems]
    batch = H.make_batch(cfgs[0].vocab_size, **BATCH)
    refs = H.references_in_process(cfgs, batch, parallel_cfg.data(world), micro_batches=MICRO_BATCHES, trim=variable)
    items = []
    for i, (cfg, ref) in enumerate(zip(cfgs, refs)):
        path = str(tmp_path / f"reference{i}.pt")
        torch.save(ref, path)
        items.append((cfg, path))
    H.spawn(run_pipeline_and_compare, world, items, parallel_cfg, batch, variable, tmp_dir=str(tmp_path))
