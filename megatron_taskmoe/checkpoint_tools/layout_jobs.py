"""Jobs that run a model in a parallel layout, in `world` gloo processes: writing a trainer checkpoint at a layout,
and computing logits in a layout.

Writing a trainer checkpoint at a layout never slices tensors by hand (megatron knows how swiglu, QKV, vocab and
expert shards are laid out; we would only duplicate it): every process builds the target layout with the
trainer's own `training.setup.build()` (model, DDP, distributed optimizer, scheduler), loads the source directory
(megatron-core reshards on load) and saves the trainer's sharded state dict (`checkpoint.state`). This module is
the one place of the checkpoint tools that imports `training`: the optimizer and scheduler a resumed run expects
are exactly the ones the trainer builds.

A one-process layout runs in this process; more processes are spawned (`torch.multiprocessing`), one set per job.
"""

from __future__ import annotations

import logging
import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state

from megatron_taskmoe import compat
from megatron_taskmoe.checkpoint import state as ckpt_state
from megatron_taskmoe.checkpoint_tools.full import (CheckpointToolError, FullCheckpoint, model_config_from_meta,
                                                   quiet_megatron)
from megatron_taskmoe.checkpoint_tools.layouts import check_layout
from megatron_taskmoe.checkpoint_tools.models import model_from_full
from megatron_taskmoe.checkpoint_tools.verify import model_logits
from megatron_taskmoe.config_io import ConfigError, from_dict, load_config, to_dict
from megatron_taskmoe.inference import CheckpointError, find_checkpoint
from megatron_taskmoe.model.config import ModelConfig, ParallelConfig, to_transformer_config
from megatron_taskmoe.model.encdec import EncoderDecoderModel
from megatron_taskmoe.parallel import groups
from megatron_taskmoe.training.config import RunConfig
from megatron_taskmoe.training.setup import build

log = logging.getLogger(__name__)


def default_run_config() -> dict:
    """The run config (as a dict) of a run with default options: what a written checkpoint's scheduler follows
    when no run config is given."""
    return to_dict(RunConfig())


def load_run_config(path: str | None, overrides: list[str]) -> dict:
    """The run config of `pretrain_mt.py --config PATH --set ...` as a dict; CheckpointToolError on a bad one."""
    try:
        return to_dict(load_config(RunConfig, path, overrides))
    except (ConfigError, OSError) as e:
        raise CheckpointToolError(f"--config/--set: {e}") from None


def optimizer_kept(source: str | os.PathLike, model_cfg: ModelConfig) -> bool:
    """Whether converting `source` keeps Adam's moments: the trainer chains a separate expert optimizer exactly
    when the model has MoE layers, whatever the layout, and the source must have been saved chained the same way
    (a checkpoint of an MoE model whose optimizer state has flat keys keeps the weights only)."""
    return ckpt_state.saved_with_chained_optimizer(source) == (ckpt_state.optimizer_chains(model_cfg) > 1)


def _rank_job(job: dict) -> None:
    """One process of a layout: build the trainer's stack, load from `job["source"]`, save to `job["out"]`
    (or, for `job["kind"] == "logits"`, run the model in the layout on a batch: `logits_in_layout`)."""
    if job.get("kind") == "logits":
        _rank_logits_job(job)
        return
    quiet_megatron()
    cfg = from_dict(RunConfig, job["run_config"])
    cfg.parallel = from_dict(ParallelConfig, job["parallel"])
    cfg.train.bf16 = False
    model_cfg = ModelConfig.from_record(job["model_config"])
    built = build(cfg, model_cfg)
    ckpt_state.zero_optimizer_state(built.optimizer)
    chained = len(ckpt_state.optimizers(built.optimizer)) > 1
    with_optimizer = job["with_optimizer"] and ckpt_state.saved_with_chained_optimizer(job["source"]) == chained
    if job["with_optimizer"] and not with_optimizer:
        # The trainer saves a chained optimizer's state under `chained_{i}.` keys and a nested structure when
        # there are several (MoE layers) and flat otherwise; a source saved with the other structure (e.g. an
        # MoE checkpoint with flat keys) cannot be mapped onto it by megatron.
        # The weights are exact either way; Adam's moments restart from zero (recorded in checkpoint.json).
        common = ckpt_state.load_common_state(job["source"])
        ckpt_state.load_model_weights(built.module, job["source"])
        scheduler, train_state = common["scheduler"], common["train_state"]
    elif with_optimizer:
        sharded = ckpt_state.sharded_state_dict(built.module, built.optimizer, is_loading=True)
        sharded["scheduler"] = None
        sharded["train_state"] = None
        loaded = ckpt_state.load_state(sharded, job["source"])
        built.module.load_state_dict(loaded["model"], strict=True)
        built.optimizer.load_state_dict(loaded["optimizer"])
        scheduler, train_state = loaded["scheduler"], loaded["train_state"]
    else:
        ckpt_state.load_model_weights(built.module, job["source"])
        for opt in ckpt_state.optimizers(built.optimizer):
            if hasattr(opt, "reload_model_params"):
                opt.reload_model_params()
        scheduler, train_state = built.scheduler.state_dict(), job["train_state"]
    sharded = ckpt_state.sharded_state_dict(built.module, built.optimizer)
    sharded["scheduler"] = scheduler
    sharded["train_state"] = train_state
    ckpt_state.save_state(sharded, job["out"])


def _rank_logits_job(job: dict) -> None:
    """One process of `logits_in_layout`: the model at the job's layout, loaded from the checkpoint (megatron
    reshards on load), run on the batch; rank 0 saves the gathered logits."""
    model_cfg = ModelConfig.from_record(job["model_config"])
    parallel = from_dict(ParallelConfig, job["parallel"])
    pg = groups.initialize_model_parallel(parallel)
    groups.model_parallel_manual_seed(0)
    tconfig = to_transformer_config(model_cfg, parallel, perform_initialization=False)
    model = EncoderDecoderModel(model_cfg, parallel, pg_collection=pg, transformer_config=tconfig).eval()
    ckpt_state.load_model_weights(model, job["source"])
    batch = torch.load(job["batch"])
    logits_BTV = model_logits(model, batch)
    if dist.get_rank() == 0:
        torch.save(logits_BTV, job["out"])


def _run_jobs(jobs: list[dict]) -> None:
    for job in jobs:
        try:
            _rank_job(job)
        finally:
            parallel_state.destroy_model_parallel()


def _worker(rank: int, world: int, port: int, jobs: list[dict], error_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        compat.apply()
        groups.init_distributed(rank=rank, world_size=world, master_port=port, backend="gloo")
        _run_jobs(jobs)
    except BaseException as e:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        raise
    finally:
        groups.destroy()


def run_layout(jobs: list[dict], world: int) -> None:
    """Run each job (`_rank_job`) in turn on `world` gloo processes; an error becomes a CheckpointToolError.

    A one-process layout runs in this process (after releasing any process group the reader made); more
    processes are spawned for each job."""
    if world == 1:
        groups.destroy()
        groups.init_distributed(rank=0, world_size=1, master_port=groups.free_port(), backend="gloo")
        try:
            _run_jobs(jobs)
        except CheckpointToolError:
            raise
        except Exception as e:
            raise CheckpointToolError(f"writing the one-process layout failed: {type(e).__name__}: {e}") from e
        finally:
            groups.destroy()
        return
    # One set of processes per job: megatron's sharding metadata (replica ids) went stale when a second layout
    # was initialized in the same processes, so process reuse is not worth the risk.
    for job in jobs:
        with tempfile.TemporaryDirectory(prefix="ckpt-tool-errors.") as error_dir:
            try:
                mp.spawn(_worker, args=(world, groups.free_port(), [job], error_dir), nprocs=world, join=True)
            except Exception as e:
                texts = [Path(error_dir, n).read_text() for n in sorted(os.listdir(error_dir))]
                first = texts[0].split("\n\n", 1)[0] if texts else str(e)
                log.debug("worker tracebacks:\n%s", "\n".join(texts))
                raise CheckpointToolError(f"the {world}-process layout failed: {first}") from None


def save_one_process_model(ckpt: FullCheckpoint, directory: Path) -> None:
    """The model part of `ckpt` as a one-process dist_checkpointing directory (a source for `run_layout`)."""
    model = model_from_full(ckpt)
    ckpt_state.save_state({"model": ckpt_state.model_sharded_state_dict(model)}, directory)


def logits_in_layout(runs: list, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Logits of trainer checkpoints, each run under its parallel layout: `runs` = [(checkpoint, ParallelConfig)]
    (one set of processes per world size). The check that a converted checkpoint computes the same function in
    the layout it was made for."""
    with tempfile.TemporaryDirectory(prefix="layout-logits.") as tmp:
        torch.save(batch, Path(tmp, "batch.pt"))
        jobs: dict[int, list] = {}
        for i, (checkpoint, parallel) in enumerate(runs):
            try:
                info = find_checkpoint(checkpoint)
            except CheckpointError as e:
                raise CheckpointToolError(str(e)) from None
            model_cfg = model_config_from_meta(info.meta, str(info.path))
            world = check_layout(model_cfg, parallel, where=str(info.path))
            jobs.setdefault(world, []).append(dict(kind="logits", model_config=to_dict(model_cfg),
                                                   parallel=to_dict(parallel), source=str(info.path),
                                                   batch=str(Path(tmp, "batch.pt")), out=str(Path(tmp, f"{i}.pt"))))
        for world, group in sorted(jobs.items()):
            run_layout(group, world)
        return [torch.load(Path(tmp, f"{i}.pt")) for i in range(len(runs))]
