"""Helpers for gloo multi-process tests: spawning workers, a reference run, and moving full weights to shards.

The parallel-equivalence tests work like this:
  1. `reference_run` builds the single-process model (world size 1, same seed), saves its full state, and
     computes per-token losses and full gradients on the global batch — split into the data-parallel shards as
     separate micro-batches (gradient accumulation with 1/dp scaling, losses and MoE aux losses alike), which is
     exactly what data parallelism computes.
  2. `spawn` starts the parallel layout; each rank builds its shard of the model, loads its slices of the full
     state (`load_full_state`), runs its data-parallel shard through megatron's `DistributedDataParallel`, calls
     megatron's `finalize_model_grads`, and checks its losses and gradient slices against the reference.

Slicing follows megatron's own parameter attributes: `tensor_model_parallel`/`partition_dim` for tensor-parallel
weights (the expert-tensor-parallel rank for expert weights), and `local_experts.{i}` -> global expert
`ep_rank * num_local + i` under expert parallelism.

Legend: B batch, S source length, T target length.
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.multiprocessing as mp

from megatron_taskmoe import compat
from megatron_taskmoe.parallel import groups

TOL = 1e-5


# ------------------------------------------------------------------------------------------------ processes
def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, error_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        compat.apply()
        groups.init_distributed(rank=rank, world_size=world_size, master_port=port)
        fn(rank, world_size, *args)
    except BaseException:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        groups.destroy()


def spawn(fn: Callable, world_size: int, *args, tmp_dir: str) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; re-raise the first rank's error text."""
    port = groups.free_port()
    try:
        mp.spawn(_worker, args=(world_size, port, fn, args, tmp_dir), nprocs=world_size, join=True)
    except Exception as exc:
        texts = []
        for rank in range(world_size):
            path = os.path.join(tmp_dir, f"rank{rank}.txt")
            if os.path.exists(path):
                texts.append(f"--- rank {rank} ---\n" + open(path).read())
        raise AssertionError("worker failed:\n" + "\n".join(texts)) from exc


# ------------------------------------------------------------------------------------------------ data
def make_batch(vocab_size: int, batch: int, src_len: int, tgt_len: int, *, num_tasks: int = 3,
               num_languages: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic batch in the project's batch format, with ragged padding on both sides."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab_size, (batch, src_len), generator=g)
    tgt = torch.randint(4, vocab_size, (batch, tgt_len), generator=g)
    labels = torch.cat([tgt[:, 1:], torch.full((batch, 1), 3)], dim=1)
    tgt[:, 0] = 2
    src_real = torch.randint(max(2, src_len // 2), src_len + 1, (batch,), generator=g)
    tgt_real = torch.randint(max(2, tgt_len // 2), tgt_len + 1, (batch,), generator=g)
    src_real[0], tgt_real[0] = src_len, tgt_len  # the longest row fills the batch
    src_mask = torch.arange(src_len)[None, :] >= src_real[:, None]
    tgt_mask = torch.arange(tgt_len)[None, :] >= tgt_real[:, None]
    src[src_mask], tgt[tgt_mask], labels[tgt_mask] = 0, 0, 0
    return dict(
        src_tokens=src, src_padding_mask=src_mask, tgt_input=tgt, labels=labels, tgt_padding_mask=tgt_mask,
        loss_mask=(~tgt_mask).float(),
        task_ids=torch.randint(0, num_tasks, (batch,), generator=g),
        src_lang_ids=torch.randint(0, num_languages, (batch,), generator=g),
        tgt_lang_ids=torch.randint(0, num_languages, (batch,), generator=g),
    )


def shard_batch(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    rows = batch["src_tokens"].shape[0]
    if rows % size:
        raise ValueError(f"batch of {rows} rows does not split over {size} data-parallel ranks")
    per = rows // size
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def split_micro_batches(shard: dict[str, torch.Tensor], count: int, *, trim: bool = False) -> list[dict]:
    """`count` micro-batches of a data-parallel shard (consecutive rows). With `trim` each is cut to its own
    longest source and target, so micro-batches differ in length (pipelining with variable sequence lengths)."""
    rows = shard["src_tokens"].shape[0]
    if rows % count:
        raise ValueError(f"shard of {rows} rows does not split into {count} micro-batches")
    per = rows // count
    out = []
    for m in range(count):
        mb = {k: v[m * per : (m + 1) * per] for k, v in shard.items()}
        if trim:
            s = int((~mb["src_padding_mask"]).sum(dim=1).max())
            t = int((~mb["tgt_padding_mask"]).sum(dim=1).max())
            for k in ("src_tokens", "src_padding_mask"):
                mb[k] = mb[k][:, :s]
            for k in ("tgt_input", "labels", "tgt_padding_mask", "loss_mask"):
                mb[k] = mb[k][:, :t]
        out.append({k: v.contiguous() for k, v in mb.items()})
    return out


def mean_loss(loss_BT: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (loss_BT * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


# ------------------------------------------------------------------------------------------------ weights
_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)")


def _is_expert(name: str) -> bool:
    return ".experts." in name


def global_name(name: str, num_local_experts: int, ep_rank: int) -> str:
    """The single-process parameter name of a local parameter (local expert index -> global index)."""
    return _LOCAL_EXPERT.sub(
        lambda m: f"{m.group(1)}{ep_rank * num_local_experts + int(m.group(2))}{m.group(3)}", name
    )


def local_slice(name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `full` for local parameter `param` (megatron's TP attributes say how it is split)."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        if full.shape != param.shape:
            raise AssertionError(f"{name}: replicated parameter of shape {tuple(param.shape)} vs full {tuple(full.shape)}")
        return full
    dim = param.partition_dim
    if _is_expert(name):
        rank, size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    else:
        rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    per = full.shape[dim] // size
    if per != param.shape[dim]:
        raise AssertionError(f"{name}: {size}-way split of {tuple(full.shape)} along {dim} != {tuple(param.shape)}")
    # megatron's partition stride (2 for a gated fc1: rank r holds the r-th part of the gate and of the up half)
    stride = getattr(param, "partition_stride", 1)
    return torch.cat(full.split(per // stride, dim=dim)[rank::size], dim=dim)


def _local_experts(model: torch.nn.Module) -> int:
    for module in model.modules():
        if hasattr(module, "num_local_experts"):
            return module.num_local_experts
    return 0


def named_full_slices(model: torch.nn.Module, full: dict[str, torch.Tensor]):
    """(name, local param, slice of the full tensor) for every parameter of the local model."""
    from megatron.core import parallel_state as ps

    num_local = _local_experts(model)
    ep_rank = ps.get_expert_model_parallel_rank()
    # A pipeline stage numbers its layers locally and holds a copy of the tied embedding as its output weight.
    whole_model_name = getattr(model, "whole_model_name", lambda n: n)
    for name, param in model.named_parameters():
        key = global_name(whole_model_name(name), num_local, ep_rank)
        if key not in full:
            raise AssertionError(f"{name} (global {key}) is missing from the reference state")
        yield name, param, local_slice(name, param, full[key])


@torch.no_grad()
def load_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    for _, param, piece in named_full_slices(model, full):
        param.copy_(piece)


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class Reference:
    state: dict[str, torch.Tensor]
    losses: list[torch.Tensor]  # per data-parallel shard, [B/dp, T] (micro-batches concatenated when untrimmed)
    grads: dict[str, torch.Tensor]
    micro_losses: Optional[list[list[torch.Tensor]]] = None  # per data-parallel shard, per micro-batch [B/dp/M, T_m]


def build_model(model_cfg, parallel_cfg=None, seed: int = 1234):
    from megatron_taskmoe.model.encdec import EncoderDecoderModel

    groups.model_parallel_manual_seed(seed)
    return EncoderDecoderModel(model_cfg, parallel_cfg)


def run_reference(model_cfg, batch: dict[str, torch.Tensor], dp: int, seed: int = 1234, *, micro_batches: int = 1,
                  trim: bool = False) -> Reference:
    """Single-process losses and gradients; the caller must have initialized world-size-1 model parallelism.

    Each data-parallel shard runs as `micro_batches` micro-batches (`split_micro_batches`), each contributing its
    mean token loss / (dp x micro_batches), as megatron's schedules and data-parallel averaging do."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    model = build_model(model_cfg, seed=seed)
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    scale = dp * micro_batches
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / scale))
    losses, micro_losses = [], []
    for r in range(dp):
        shard_losses = []
        for mb in split_micro_batches(shard_batch(batch, r, dp), micro_batches, trim=trim):
            loss_BT = model(**mb)
            (mean_loss(loss_BT, mb) / scale).backward()
            shard_losses.append(loss_BT.detach().clone())
        micro_losses.append(shard_losses)
        if len({x.shape[1] for x in shard_losses}) == 1:
            losses.append(torch.cat(shard_losses, dim=0))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    grads = {k: v.grad.detach().clone() for k, v in model.named_parameters() if v.grad is not None}
    return Reference(state=state, losses=losses, grads=grads, micro_losses=micro_losses)


def references_in_process(model_cfgs, batch, dp: int, seed: int = 1234, **micro) -> list[Reference]:
    """`run_reference` for each config in this process under a temporary world-size-1 gloo group (`micro`:
    `micro_batches`, `trim` as in `run_reference`)."""
    groups.init_distributed(rank=0, world_size=1)
    try:
        groups.initialize_model_parallel()
        return [run_reference(cfg, batch, dp, seed, **micro) for cfg in model_cfgs]
    finally:
        groups.destroy()


def run_parallel_and_compare(rank: int, world_size: int, items, parallel_cfg, batch, seed: int = 1234) -> None:
    """Worker body: for each (model config, reference path), build the shard, load the reference weights, run one
    step through megatron's DDP and `finalize_model_grads`, and compare losses and gradient slices."""
    from megatron.core import parallel_state as ps

    groups.initialize_model_parallel(parallel_cfg)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    shard = shard_batch(batch, dp_rank, dp)
    for model_cfg, ref_path in items:
        _compare_one(rank, model_cfg, parallel_cfg, shard, dp_rank, torch.load(ref_path, weights_only=False), seed)


def _compare_one(rank, model_cfg, parallel_cfg, shard, dp_rank, ref: Reference, seed: int) -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model = build_model(model_cfg, parallel_cfg, seed=seed)
    load_full_state(model, ref.state)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False),
        module=model,
    )
    ddp.zero_grad_buffer()
    loss_BT = ddp(**shard)
    torch.testing.assert_close(loss_BT.detach(), ref.losses[dp_rank], atol=TOL, rtol=TOL)
    mean_loss(loss_BT, shard).backward()
    finalize_model_grads([ddp])
    full_grads = {k: torch.zeros_like(v) for k, v in ref.state.items()} | ref.grads
    checked = 0
    for name, param, full_grad in named_full_slices(model, full_grads):
        torch.testing.assert_close(param.main_grad, full_grad, atol=TOL, rtol=TOL,
                                   msg=lambda m, n=name: f"rank {rank} grad of {n}: {m}")
        checked += 1
    assert checked == len(list(model.parameters())) > 0


def check_initialisation(rank: int, world_size: int, items, parallel_cfg, seed: int = 1234) -> None:
    """Worker body: for each (model config, reference path), build the shard from `seed` and check that every
    parameter equals its slice of the single-process model built from the same seed (no weights loaded)."""
    groups.initialize_model_parallel(parallel_cfg)
    for model_cfg, ref_path in items:
        model = build_model(model_cfg, parallel_cfg, seed=seed)
        full = torch.load(ref_path, weights_only=False).state
        checked = 0
        for name, param, piece in named_full_slices(model, full):
            torch.testing.assert_close(param.detach(), piece, atol=0, rtol=0,
                                       msg=lambda m, n=name: f"rank {rank}: initial {n} differs: {m}")
            checked += 1
        assert checked == len(list(model.parameters())) > 0
