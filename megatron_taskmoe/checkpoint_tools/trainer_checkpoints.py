"""Writing trainer checkpoints (megatron-core dist_checkpointing directories at a parallel layout) offline.

`write_trainer_checkpoint` writes a `FullCheckpoint` with a fresh optimizer and scheduler; `convert_trainer_checkpoint`
reshards a trainer checkpoint straight from its directory, optimizer state included, so a converted run resumes
with its Adam moments. Both go through `layout_jobs` (the trainer's own build in `world` gloo processes). Outputs are
atomic: everything is written to a `.partial.` sibling directory that is renamed only when complete.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from megatron_taskmoe.checkpoint.format import TOKENIZER_FILE
from megatron_taskmoe.checkpoint.record import CheckpointRecord, write_record
from megatron_taskmoe.checkpoint.state import optimizer_chains
from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError, FullCheckpoint, model_config_from_meta
from megatron_taskmoe.checkpoint_tools.layout_jobs import (default_run_config, optimizer_kept, run_layout,
                                                          save_one_process_model)
from megatron_taskmoe.checkpoint_tools.layouts import check_layout
from megatron_taskmoe.checkpoint_tools.outputs import atomic_dir, check_output
from megatron_taskmoe.config_io import to_dict
from megatron_taskmoe.inference import CheckpointError, find_checkpoint
from megatron_taskmoe.model.config import ParallelConfig

log = logging.getLogger(__name__)


def write_trainer_checkpoint(ckpt: FullCheckpoint, out: str | os.PathLike, parallel: ParallelConfig, *,
                             run_config: Optional[dict] = None, overwrite: bool = False,
                             extra_meta: Optional[dict] = None) -> Path:
    """`ckpt` as a trainer checkpoint at `parallel`, with a fresh optimizer (zero Adam moments) and scheduler
    built from `run_config` (the run that will continue from it: its optim section and train.steps), step 0.

    `pretrain_mt.py --set checkpoint.load=OUT` then starts from these weights."""
    model_cfg = ckpt.model_config()
    world = check_layout(model_cfg, parallel, where=str(out))
    out = check_output(out, overwrite)
    run_config = run_config or default_run_config()
    with atomic_dir(out, overwrite) as partial:
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.one-process.", dir=out.parent) as staging:
            save_one_process_model(ckpt, Path(staging))
            job = dict(run_config=run_config, parallel=to_dict(parallel), model_config=to_dict(model_cfg),
                       with_optimizer=False, source=staging, out=str(partial),
                       train_state={"step": 0, "consumed_samples": 0, "best_bleu": None,
                                    "evals_without_improvement": 0, "skipped_steps": 0, "history": []})
            run_layout([job], world)
        meta = copy.deepcopy(ckpt.meta)
        meta.update(step=0, metric=None, consumed_samples=0, parallel=to_dict(parallel),
                    model_config=to_dict(model_cfg), optimizer_chains=optimizer_chains(model_cfg),
                    **(extra_meta or {}))
        write_record(partial, CheckpointRecord.from_dict(meta, where=str(out)), ckpt.tokenizer)
    return out


def convert_trainer_checkpoint(source: str | os.PathLike, out: str | os.PathLike, parallel: ParallelConfig, *,
                               overwrite: bool = False) -> Path:
    """Reshard a trainer checkpoint (model, optimizer, scheduler, counters) to `parallel`, offline."""
    return convert_trainer_checkpoint_many(source, [(out, parallel)], overwrite=overwrite)[0]


def convert_trainer_checkpoint_many(source: str | os.PathLike, targets: list[tuple[str | os.PathLike, ParallelConfig]],
                                    *, overwrite: bool = False) -> list[Path]:
    """`convert_trainer_checkpoint` to several layouts; targets of one world size share one set of processes.

    Every target is checked before anything runs; each output appears only when complete."""
    try:
        info = find_checkpoint(source)
    except CheckpointError as e:
        raise CheckpointToolError(str(e)) from None
    model_cfg = model_config_from_meta(info.meta, str(info.path))
    tokenizer = info.path / TOKENIZER_FILE
    planned = []
    for out, parallel in targets:
        world = check_layout(model_cfg, parallel, info.record.parallel or {}, where=str(out))
        out = check_output(out, overwrite)
        if out.resolve() == info.path.resolve():
            raise CheckpointToolError(f"{out}: the output must differ from the source checkpoint")
        planned.append((out, parallel, world))
    if len({p[0].resolve() for p in planned}) != len(planned):
        raise CheckpointToolError("two conversion targets name the same output")
    with contextlib.ExitStack() as stack:
        partials = [stack.enter_context(atomic_dir(out, overwrite)) for out, _, _ in planned]
        for world in sorted({w for _, _, w in planned}):
            jobs = [dict(run_config=default_run_config(), parallel=to_dict(parallel), model_config=to_dict(model_cfg),
                         with_optimizer=True, source=str(info.path), out=str(partial), train_state=None)
                    for (out, parallel, w), partial in zip(planned, partials) if w == world]
            run_layout(jobs, world)
        for (out, parallel, _), partial in zip(planned, partials):
            record = copy.deepcopy(info.record)
            kept = optimizer_kept(info.path, model_cfg)
            if not kept:
                log.warning("%s: Adam's moments restart from zero (the source's optimizer is chained differently: "
                            "saved before expert weights always had their own optimizer); weights, LR schedule and "
                            "counters are kept", out)
            record.parallel = to_dict(parallel)
            record.optimizer_chains = optimizer_chains(model_cfg)
            record.converted_from = {"path": str(info.path), "parallel": info.record.parallel,
                                     "optimizer_state": "kept" if kept else "reset"}
            write_record(partial, record, tokenizer.read_bytes() if tokenizer.is_file() else None)
    return [p[0] for p in planned]
