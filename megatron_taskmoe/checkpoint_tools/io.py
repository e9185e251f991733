"""Reading and writing checkpoints: trainer directories (any TP/EP layout) and one parallelism-free file.

The pivot of every tool is `FullCheckpoint`: full tensors named as in the single-process `EncoderDecoderModel`
(TP = PP = EP = 1, experts `...experts.local_experts.{e}...` with global e), the `checkpoint.json` record (model
config, task map, languages, tokenizer hash, ...) and the tokenizer's bytes.

Reading a trainer checkpoint goes through the inference loader (`megatron_taskmoe.inference.load_checkpoint`):
megatron-core's dist_checkpointing reshards whatever layout the run saved into the one-process model.

Writing a trainer checkpoint at a layout never slices tensors by hand (megatron knows how swiglu, QKV, vocab and
expert shards are laid out; we would only duplicate it): the full state is first saved as a one-process
dist_checkpointing directory, then `world` gloo processes build the target layout with the trainer's own `build()`
(model, DDP, distributed optimizer, scheduler), load that directory (resharding on load) and save the trainer's
sharded state dict. `convert_trainer_checkpoint` does the same straight from the source checkpoint, optimizer state
included, so a converted run resumes with its Adam moments. Outputs are atomic: everything is written to a
`.partial.` sibling directory (or temporary file) that is renamed only when complete.

Legend: TP tensor-, EP expert-, PP pipeline-parallel sizes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from megatron_taskmoe.config_io import ConfigError, from_dict, to_dict
from megatron_taskmoe.fileio import write_atomic
from megatron_taskmoe.model.config import ModelConfig, ParallelConfig

log = logging.getLogger(__name__)

FORMAT = "megatron-taskmoe/full-v1"
TOKENIZER_KEY = "__tokenizer_model__"
MARKER = "checkpoint.json"
TOKENIZER_FILE = "tokenizer.model"
SINGLE_FILE_SUFFIX = ".safetensors"


class CheckpointToolError(ValueError):
    """A checkpoint or an option the tools cannot use as asked; the message names the file or the option."""


@dataclass(kw_only=True)
class FullCheckpoint:
    """A whole model in one process: full tensors, the checkpoint record and the tokenizer."""

    state: dict[str, torch.Tensor]
    meta: dict
    """`checkpoint.json`'s fields: model_config, task_map, languages, tokenizer_sha256, parallel, step, ..."""
    tokenizer: Optional[bytes] = None
    source: str = ""

    def model_config(self) -> ModelConfig:
        return model_config_from_meta(self.meta, self.source)

    def with_model_config(self, cfg: ModelConfig) -> "FullCheckpoint":
        meta = copy.deepcopy(self.meta)
        meta["model_config"] = to_dict(cfg)
        return FullCheckpoint(state=self.state, meta=meta, tokenizer=self.tokenizer, source=self.source)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())


def model_config_from_meta(meta: dict, where: str = "") -> ModelConfig:
    if "model_config" not in meta:
        raise CheckpointToolError(f"{where}: no model_config in the checkpoint record (not written by pretrain_mt.py)")
    try:
        return ModelConfig.from_record(meta["model_config"])
    except ConfigError as e:
        raise CheckpointToolError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------------------ process groups
def _quiet_megatron() -> None:
    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def one_process_groups():
    """megatron's process groups for a one-process model (TP = PP = EP = 1); created if none exist."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_taskmoe.parallel import groups

    _quiet_megatron()
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise CheckpointToolError("the checkpoint tools run in one process; torch.distributed has "
                                  f"{dist.get_world_size()} (run them outside torchrun)")
    if not dist.is_initialized():
        groups.init_distributed(rank=0, world_size=1, master_port=groups.free_port(), backend="gloo")
    if not parallel_state.model_parallel_is_initialized():
        return groups.initialize_model_parallel()
    return ProcessGroupCollection.use_mpu_process_groups()


def build_model(model_cfg: ModelConfig):
    """The one-process `EncoderDecoderModel` (eval mode, CPU), weights uninitialized (they are loaded next)."""
    from megatron_taskmoe.model.config import to_transformer_config
    from megatron_taskmoe.model.encdec import EncoderDecoderModel

    pg = one_process_groups()
    tconfig = to_transformer_config(model_cfg, ParallelConfig(), perform_initialization=False)
    return EncoderDecoderModel(model_cfg, ParallelConfig(), pg_collection=pg, transformer_config=tconfig).eval()


def model_from_full(ckpt: FullCheckpoint):
    """A one-process model holding `ckpt`'s weights (strict: every tensor must match by name and shape)."""
    model = build_model(ckpt.model_config())
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    check_state_matches(ckpt.state, {k: tuple(v.shape) for k, v in expected.items()}, ckpt.source)
    model.load_state_dict({**model.state_dict(), **ckpt.state}, strict=True)
    return model


def check_state_matches(state: dict, shapes: dict[str, tuple], where: str) -> None:
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {shapes[k]}" for k in sorted(set(state) & set(shapes))
             if tuple(state[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[:3]}")
        raise CheckpointToolError(f"{where}: the weights do not fit the model config: " + "; ".join(parts))


# ------------------------------------------------------------------------------------------------ reading
def read_trainer_checkpoint(path: str | os.PathLike) -> FullCheckpoint:
    """A trainer checkpoint directory (or root / run directory) of any layout, through the inference loader."""
    from megatron_taskmoe.inference import CheckpointError, load_checkpoint

    _quiet_megatron()
    one_process_groups()
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = load_checkpoint(path, device="cpu")
    except CheckpointError as e:
        raise CheckpointToolError(str(e)) from None
    except CheckpointException as e:  # a BaseException in torch: a missing or unreadable shard file
        raise CheckpointToolError(f"{path}: cannot load the model from this checkpoint: {_first_failure(e)}") from None
    state = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    tokenizer = Path(loaded.tokenizer.path).read_bytes() if getattr(loaded.tokenizer, "path", None) else None
    return FullCheckpoint(state=state, meta=copy.deepcopy(loaded.meta), tokenizer=tokenizer,
                          source=str(loaded.checkpoint))


def _first_failure(e: BaseException) -> str:
    """The first rank's underlying error of torch's CheckpointException (e.g. the missing shard's path)."""
    failures = getattr(e, "failures", None) or {}
    for _, failure in sorted(failures.items()):
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(inner).__name__}: {inner}"
    return f"{type(e).__name__}: {e}"


def read_single_file(path: str | os.PathLike) -> FullCheckpoint:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointToolError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointToolError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointToolError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r} "
                                  "(written by tools/checkpoint/convert.py --single-file)")
    meta = json.loads(header["meta"])
    token = tensors.pop(TOKENIZER_KEY, None)
    tokenizer = bytes(token.numpy().tobytes()) if token is not None else None
    return FullCheckpoint(state=tensors, meta=meta, tokenizer=tokenizer, source=str(path))


def read_checkpoint(path: str | os.PathLike) -> FullCheckpoint:
    """A trainer checkpoint directory or a single `.safetensors` file written by `write_single_file`."""
    path = Path(path)
    if path.is_file():
        return read_single_file(path)
    if not path.exists():
        raise CheckpointToolError(f"{path}: no such checkpoint (a trainer checkpoint directory or a "
                                  f"{SINGLE_FILE_SUFFIX} file)")
    return read_trainer_checkpoint(path)


# ------------------------------------------------------------------------------------------------ atomic output
def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointToolError(f"{path}: already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise CheckpointToolError(f"{path.parent}: output's parent directory does not exist")
    return path


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty `.partial.NAME` sibling of `final`; renamed to `final` on success, removed on error."""
    final = check_output(final, overwrite)
    partial = final.parent / f".partial.{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_single_file(ckpt: FullCheckpoint, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """One safetensors file: the tensors, the record as JSON in the header, the tokenizer as a byte tensor."""
    from safetensors.torch import save_file

    path = check_output(path, overwrite)
    tensors = {k: v.detach().contiguous().clone() for k, v in ckpt.state.items()}
    if ckpt.tokenizer is not None:
        tensors[TOKENIZER_KEY] = torch.frombuffer(bytearray(ckpt.tokenizer), dtype=torch.uint8).clone()
    metadata = {"format": FORMAT, "meta": json.dumps(ckpt.meta, sort_keys=True)}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), suffix=".tmp")


def write_record(directory: Path, meta: dict, tokenizer: Optional[bytes]) -> None:
    (directory / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    if tokenizer is not None:
        (directory / TOKENIZER_FILE).write_bytes(tokenizer)


# ------------------------------------------------------------------------------------------------ layouts
def parse_layout(tensor: int = 1, expert: int = 1, pipeline: int = 1, expert_tensor: Optional[int] = None
                 ) -> ParallelConfig:
    if pipeline != 1:
        raise CheckpointToolError(f"--pipeline {pipeline}: pretrain_mt.py does not train with pipeline parallelism "
                                  "yet, so checkpoints are written with pipeline=1")
    try:
        return ParallelConfig(tensor=tensor, pipeline=pipeline, expert=expert, expert_tensor=expert_tensor)
    except ValueError as e:
        raise CheckpointToolError(f"parallel layout: {e}") from None


def minimal_world_size(parallel: ParallelConfig) -> int:
    """The fewest processes that hold the layout: TP x PP x DP with EP x ETP dividing DP x TP."""
    etp = parallel.tensor if parallel.expert_tensor is None else parallel.expert_tensor
    for dp in range(1, parallel.expert * etp + 1):
        world = parallel.tensor * parallel.pipeline * dp
        try:
            parallel.validate_world_size(world)
            return world
        except ValueError:
            continue
    raise CheckpointToolError(f"no world size holds the layout {to_dict(parallel)}")


def check_layout(model_cfg: ModelConfig, parallel: ParallelConfig, source_parallel: Optional[dict] = None,
                 where: str = "") -> int:
    """Every divisibility of the target layout, and an embedding padding equal to the source's; the world size."""
    world = minimal_world_size(parallel)
    try:
        parallel.validate(model_cfg, world)
    except ValueError as e:
        raise CheckpointToolError(f"{where}: incompatible sizes for the target layout: {e}") from None
    if source_parallel is not None:
        src_tp = int(source_parallel.get("tensor", 1))
        if model_cfg.padded_vocab_size(src_tp) != model_cfg.padded_vocab_size(parallel.tensor):
            raise CheckpointToolError(
                f"{where}: the embedding has {model_cfg.padded_vocab_size(src_tp)} rows at tensor={src_tp} but "
                f"{model_cfg.padded_vocab_size(parallel.tensor)} at tensor={parallel.tensor} "
                "(vocab_pad_multiple); convert through --single-file first")
    return world


# ------------------------------------------------------------------------------------------------ writing
def _sharded_state_dict(built, is_loading: bool) -> dict:
    """The trainer's model + optimizer sharded state dict (`Trainer._sharded_state_dict`)."""
    from megatron_taskmoe.training.loop import MODEL_CKPT_METADATA, OPTIMIZER_CKPT_METADATA

    model_sd = built.module.sharded_state_dict(metadata=MODEL_CKPT_METADATA)
    return {"model": model_sd,
            "optimizer": built.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                            metadata=OPTIMIZER_CKPT_METADATA)}


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _fresh_optimizer_state(optimizer) -> None:
    """Materialise Adam's state as at step 0 (zero moments), as the loading template and a fresh start need."""
    for opt in _optimizers(optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
        for state in opt.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    value.zero_()
                elif key == "step":
                    state[key] = 0
        for group in opt.optimizer.param_groups:
            if "step" in group:
                group["step"] = 0


def _chained(optimizer) -> bool:
    return len(_optimizers(optimizer)) > 1


def _same_optimizer_structure(optimizer, source: str) -> bool:
    """Whether `source`'s optimizer state was saved by an optimizer chained like `optimizer` (see `_rank_job`)."""
    from megatron.core import dist_checkpointing

    keys = dist_checkpointing.load_tensors_metadata(source).keys()
    return any(k.startswith("chained_") for k in keys) == _chained(optimizer)


def optimizer_kept(source: str | os.PathLike, parallel: ParallelConfig, model_cfg: ModelConfig) -> bool:
    """Whether converting `source` to `parallel` keeps Adam's moments (same optimizer chaining, see `_rank_job`):
    the trainer chains a separate expert optimizer exactly when the model has MoE layers, whatever the layout
    (`training.setup.mark_expert_parameters`); checkpoints from before that had it only under expert parallelism."""
    from megatron.core import dist_checkpointing

    del parallel  # the structure no longer depends on the layout
    src_chained = any(k.startswith("chained_") for k in dist_checkpointing.load_tensors_metadata(str(source)))
    return src_chained == (optimizer_chains(model_cfg) > 1)


def optimizer_chains(model_cfg: ModelConfig) -> int:
    """How many chained optimizers the trainer builds for `model_cfg` under any layout (dense, then expert
    parameters: `training.setup.mark_expert_parameters`); recorded as `optimizer_chains` in checkpoint.json."""
    return 2 if model_cfg.num_moe_layers() > 0 else 1


def _rank_job(job: dict) -> None:
    """One process of a layout: build the trainer's stack, load from `job["source"]`, save to `job["out"]`
    (or, for `job["kind"] == "logits"`, run the model in the layout on a batch: `verify.logits_in_layout`)."""
    from megatron.core import dist_checkpointing

    if job.get("kind") == "logits":
        from megatron_taskmoe.checkpoint_tools.verify import rank_logits_job

        rank_logits_job(job)
        return

    from megatron_taskmoe.training.config import RunConfig
    from megatron_taskmoe.training.setup import build

    _quiet_megatron()
    cfg = from_dict(RunConfig, job["run_config"])
    cfg.parallel = from_dict(ParallelConfig, job["parallel"])
    cfg.train.bf16 = False
    model_cfg = ModelConfig.from_record(job["model_config"])
    built = build(cfg, model_cfg)
    _fresh_optimizer_state(built.optimizer)
    with_optimizer = job["with_optimizer"] and _same_optimizer_structure(built.optimizer, job["source"])
    if job["with_optimizer"] and not with_optimizer:
        # The trainer saves a chained optimizer's state under `chained_{i}.` keys and a nested structure when
        # there are several (MoE layers; before `mark_expert_parameters`, only under expert parallelism > 1) and
        # flat otherwise, so megatron cannot map one onto the other.
        # The weights are exact either way; Adam's moments restart from zero (recorded in checkpoint.json).
        common = dist_checkpointing.load_common_state_dict(job["source"])
        from megatron_taskmoe.training.loop import MODEL_CKPT_METADATA

        loaded = dist_checkpointing.load({"model": built.module.sharded_state_dict(metadata=MODEL_CKPT_METADATA)},
                                         job["source"])
        built.module.load_state_dict(loaded["model"], strict=True)
        scheduler, train_state = common["scheduler"], common["train_state"]
    elif with_optimizer:
        sharded = _sharded_state_dict(built, is_loading=True)
        sharded["scheduler"] = None
        sharded["train_state"] = None
        loaded = dist_checkpointing.load(sharded, job["source"])
        built.module.load_state_dict(loaded["model"], strict=True)
        built.optimizer.load_state_dict(loaded["optimizer"])
        scheduler, train_state = loaded["scheduler"], loaded["train_state"]
    else:
        from megatron_taskmoe.training.loop import MODEL_CKPT_METADATA

        loaded = dist_checkpointing.load({"model": built.module.sharded_state_dict(metadata=MODEL_CKPT_METADATA)},
                                         job["source"])
        built.module.load_state_dict(loaded["model"], strict=True)
        for opt in _optimizers(built.optimizer):
            if hasattr(opt, "reload_model_params"):
                opt.reload_model_params()
        scheduler, train_state = built.scheduler.state_dict(), job["train_state"]
    sharded = _sharded_state_dict(built, is_loading=False)
    sharded["scheduler"] = scheduler
    sharded["train_state"] = train_state
    dist_checkpointing.save(sharded, job["out"])


def _run_jobs(jobs: list[dict]) -> None:
    from megatron.core import parallel_state

    for job in jobs:
        try:
            _rank_job(job)
        finally:
            parallel_state.destroy_model_parallel()


def _worker(rank: int, world: int, port: int, jobs: list[dict], error_dir: str) -> None:
    from megatron_taskmoe import compat
    from megatron_taskmoe.parallel import groups

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
    import torch.multiprocessing as mp

    from megatron_taskmoe.parallel import groups

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
    from megatron.core import dist_checkpointing

    from megatron_taskmoe.training.loop import MODEL_CKPT_METADATA

    model = model_from_full(ckpt)
    dist_checkpointing.save({"model": model.sharded_state_dict(metadata=MODEL_CKPT_METADATA)}, str(directory))


def default_run_config() -> dict:
    from megatron_taskmoe.training.config import RunConfig

    return to_dict(RunConfig())


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
        write_record(partial, meta, ckpt.tokenizer)
    return out


def convert_trainer_checkpoint(source: str | os.PathLike, out: str | os.PathLike, parallel: ParallelConfig, *,
                               overwrite: bool = False) -> Path:
    """Reshard a trainer checkpoint (model, optimizer, scheduler, counters) to `parallel`, offline."""
    return convert_trainer_checkpoint_many(source, [(out, parallel)], overwrite=overwrite)[0]


def convert_trainer_checkpoint_many(source: str | os.PathLike, targets: list[tuple[str | os.PathLike, ParallelConfig]],
                                    *, overwrite: bool = False) -> list[Path]:
    """`convert_trainer_checkpoint` to several layouts; targets of one world size share one set of processes.

    Every target is checked before anything runs; each output appears only when complete."""
    from megatron_taskmoe.inference import CheckpointError, find_checkpoint

    try:
        info = find_checkpoint(source)
    except CheckpointError as e:
        raise CheckpointToolError(str(e)) from None
    model_cfg = model_config_from_meta(info.meta, str(info.path))
    tokenizer = info.path / TOKENIZER_FILE
    planned = []
    for out, parallel in targets:
        world = check_layout(model_cfg, parallel, info.meta.get("parallel", {}), where=str(out))
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
            meta = copy.deepcopy(info.meta)
            kept = optimizer_kept(info.path, parallel, model_cfg)
            if not kept:
                log.warning("%s: Adam's moments restart from zero (the source's optimizer is chained differently: "
                            "saved before expert weights always had their own optimizer); weights, LR schedule and "
                            "counters are kept", out)
            meta.update(parallel=to_dict(parallel), optimizer_chains=optimizer_chains(model_cfg),
                        converted_from={"path": str(info.path), "parallel": info.meta.get("parallel"),
                                        "optimizer_state": "kept" if kept else "reset"})
            write_record(partial, meta, tokenizer.read_bytes() if tokenizer.is_file() else None)
    return [p[0] for p in planned]


def describe(ckpt: FullCheckpoint) -> dict[str, Any]:
    """A short summary for the tools' logs and tests."""
    cfg = ckpt.model_config()
    return {"source": ckpt.source, "parameters": ckpt.num_parameters(), "tensors": len(ckpt.state),
            "tasks": ckpt.meta.get("task_map", {}).get("tasks"), "languages": ckpt.meta.get("languages"),
            "num_experts": cfg.moe.num_experts if cfg.moe else 0, "step": ckpt.meta.get("step"),
            "parallel": ckpt.meta.get("parallel")}


def isclose_state(a: dict, b: dict) -> float:
    """Largest absolute difference between two states with the same names (inf if names or shapes differ)."""
    if set(a) != set(b):
        return math.inf
    worst = 0.0
    for k in a:
        if a[k].shape != b[k].shape:
            return math.inf
        if a[k].numel():
            worst = max(worst, float((a[k].float() - b[k].float()).abs().max()))
    return worst


__all__ = ["CheckpointToolError", "FullCheckpoint", "read_checkpoint", "read_trainer_checkpoint", "read_single_file",
           "write_single_file", "write_trainer_checkpoint", "convert_trainer_checkpoint", "parse_layout",
           "model_from_full", "build_model", "describe"]


def read_info_parallel(path: str | os.PathLike) -> dict:
    """The `parallel` layout recorded in a trainer checkpoint's `checkpoint.json`."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointToolError(f"{path}: no {MARKER}")
    return json.loads(marker.read_text(encoding="utf-8")).get("parallel", {})
