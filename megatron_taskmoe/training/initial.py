"""The model a run starts from, without the run: its step-0 weights as one `FullCheckpoint`.

`initial_checkpoint(cfg)` does what `pretrain_mt.py` does before its first step, up to the model: the corpus and
the model config resolved by `setup.load_corpus` / `setup.resolve_model_config`, the seed set by
`groups.model_parallel_manual_seed(train.seed)`, an `EncoderDecoderModel` initialised from `train.seed`. It builds
no optimizer and no DDP buffers and runs in one process (TP = PP = EP = 1): the initialisation draws every whole
tensor from the seed (`model/init.py`), so the weights are the trainer's float32 weights at step 0 under any
parallel layout, and a model too large to train on a machine can still be built there. What it is for: measurements
that need a model of a given size but not a trained one (serving throughput, `benchmarks/serving.py --untrained`).
The record is the one the trainer's `save_checkpoint` writes, at step 0; `checkpoint_tools.single_file` writes it.
"""

from __future__ import annotations

import hashlib

import torch

from megatron_taskmoe.checkpoint.record import CheckpointRecord
from megatron_taskmoe.checkpoint_tools.full import FullCheckpoint
from megatron_taskmoe.checkpoint_tools.layouts import minimal_world_size
from megatron_taskmoe.checkpoint_tools.models import tool_process_groups
from megatron_taskmoe.config_io import ConfigError, to_dict
from megatron_taskmoe.model.config import ParallelConfig, to_transformer_config
from megatron_taskmoe.model.encdec import EncoderDecoderModel
from megatron_taskmoe.parallel import groups
from megatron_taskmoe.training.config import RunConfig
from megatron_taskmoe.training.setup import load_corpus, resolve_model_config


def initial_checkpoint(cfg: RunConfig) -> FullCheckpoint:
    """The step-0 model of a run of `cfg` with its record and tokenizer (call `compat.apply()` first).

    ConfigError (naming the option or file) on a config the trainer would refuse, before anything is built;
    CheckpointToolError inside a multi-process job."""
    corpus = load_corpus(cfg)
    model_cfg = resolve_model_config(cfg, corpus, minimal_world_size(cfg.parallel))
    tokenizer = corpus.tokenizer_path.read_bytes()
    if hashlib.sha256(tokenizer).hexdigest() != corpus.tokenizer_sha256:
        raise ConfigError(f"{corpus.tokenizer_path}: changed since {corpus.data_dir} was preprocessed (its sha256 "
                          "differs from manifest.json's)")
    pg = tool_process_groups()
    groups.model_parallel_manual_seed(cfg.train.seed)
    tconfig = to_transformer_config(model_cfg, ParallelConfig())
    model = EncoderDecoderModel(model_cfg, ParallelConfig(), pg_collection=pg, transformer_config=tconfig,
                                init_seed=cfg.train.seed)
    # the model's own tensors (no copy): the model is dropped on return
    state = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    record = CheckpointRecord(
        step=0, metric=None, task_map=corpus.manifest["task_map"], languages=corpus.manifest["languages"],
        tokenizer_sha256=corpus.tokenizer_sha256, model_config=to_dict(model_cfg), parallel=to_dict(cfg.parallel),
        consumed_samples=0,
    )
    return FullCheckpoint(state=state, meta=record.to_dict(), tokenizer=tokenizer,
                          source=f"the initial model of {cfg.train.run_dir or 'a run'} (seed {cfg.train.seed})")
