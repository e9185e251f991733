"""Everything a run needs before its first step: corpus facts, validated config, process groups, model, optimizer.

Order matters and is the point of this module: read the manifest and check the config against it and the world
size *before* building anything expensive, so a bad config fails in a second with a message naming the option.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.enums import ModelType
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_taskmoe.config_io import ConfigError
from megatron_taskmoe.data.bitext import DataError
from megatron_taskmoe.data.manifest import load_manifest
from megatron_taskmoe.model.config import ModelConfig, ParallelConfig, to_transformer_config
from megatron_taskmoe.model.encdec import EncoderDecoderModel
from megatron_taskmoe.parallel import groups, pipeline
from megatron_taskmoe.training.config import RunConfig

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Corpus:
    """What the run needs to know about the preprocessed data (from manifest.json)."""

    data_dir: Path
    """Directory of the preprocessed data."""
    manifest: dict
    """The parsed manifest.json."""
    directions: list[str]
    """The directions the run trains on (data.directions, or every direction with a train split)."""

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def num_tasks(self) -> int:
        return len(self.manifest["task_map"]["tasks"])

    @property
    def num_languages(self) -> int:
        return len(self.manifest["languages"])

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.manifest["tokenizer"]["path"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]


def load_corpus(cfg: RunConfig) -> Corpus:
    """Read and check the data directory named by `data.data_dir`; ConfigError on anything missing."""
    if not cfg.data.data_dir:
        raise ConfigError("data.data_dir is not set (a directory written by tools/preprocess_data.py)")
    data_dir = Path(cfg.data.data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"data.data_dir={str(data_dir)!r}: no such directory")
    try:
        manifest = load_manifest(data_dir)
    except DataError as e:
        raise ConfigError(f"data.data_dir: {e}") from e
    available = sorted(manifest["directions"])
    directions = cfg.data.directions or [d for d in available if "train" in manifest["directions"][d]["splits"]]
    unknown = [d for d in directions if d not in available]
    if unknown:
        raise ConfigError(f"data.directions: {', '.join(unknown)} not in {data_dir}/manifest.json "
                          f"(available: {', '.join(available)})")
    no_train = [d for d in directions if "train" not in manifest["directions"][d]["splits"]]
    if no_train:
        raise ConfigError(f"data.directions: {', '.join(no_train)} have no train split in {data_dir}")
    tok = Path(manifest["tokenizer"]["path"])
    if not tok.is_file():
        raise ConfigError(f"{data_dir}/manifest.json names tokenizer {tok}, which does not exist")
    return Corpus(data_dir=data_dir, manifest=manifest, directions=directions)


def check_task_map(saved: Optional[dict], corpus: Corpus) -> None:
    """A checkpoint's task-id mapping must equal the data's: ids index task tables and adapters."""
    if saved is None:
        return
    current = corpus.manifest["task_map"]
    if saved.get("tasks") != current.get("tasks") or saved.get("direction_to_task") != current.get(
            "direction_to_task"):
        raise ConfigError(
            f"the checkpoint's task map {saved.get('direction_to_task')} disagrees with "
            f"{corpus.data_dir}/manifest.json {current.get('direction_to_task')}: task ids would shift "
            "(preprocess with the same --task-map, or start a fresh run)"
        )


def resolve_model_config(cfg: RunConfig, corpus: Corpus, world_size: int) -> ModelConfig:
    """The model for this corpus, validated against the launch (all before any process group exists)."""
    try:
        model_cfg = cfg.model.build(vocab_size=corpus.vocab_size, num_tasks=corpus.num_tasks,
                                    num_languages=corpus.num_languages)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    cfg.validate_against(world_size, model_cfg)
    return model_cfg


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_bf16(cfg: RunConfig) -> bool:
    return torch.cuda.is_available() if cfg.train.bf16 is None else cfg.train.bf16


def mark_expert_parameters(module: torch.nn.Module) -> int:
    """Give every expert weight megatron's `allreduce=False` mark, also without expert parallelism; returns how
    many parameters were marked.

    megatron-core 0.16.1 marks expert weights only when expert parallelism is > 1 (`ColumnParallelLinear` /
    `RowParallelLinear`: `allreduce = not (is_expert and expert_parallel)`), and both `DistributedDataParallel`
    (a separate gradient buffer over the expert-data-parallel group) and `get_megatron_optimizer` (a second,
    chained optimizer) follow that mark. Unmarked at EP=1, the experts would share the dense optimizer, whose
    checkpoint then has another structure than at EP>1 (one flat optimizer instead of `chained_0`/`chained_1`), and
    a resume across EP=1 and EP>1 could not map the Adam moments. Marked always, the structure is the same under
    every layout, and the fully reshardable optimizer format reshards the expert moments like the weights. At EP=1
    the expert-data-parallel group is the data-parallel group and megatron scales both buffers' gradients by 1/DP,
    so the training is unchanged (up to the summation order of the gradient norm)."""
    marked = 0
    for sub in module.modules():
        if not getattr(sub, "is_expert", False):
            continue
        for param in sub.parameters(recurse=False):
            if getattr(param, "allreduce", True):
                param.allreduce = False
                marked += 1
    return marked


@dataclass(kw_only=True)
class Built:
    """The live objects of a run."""

    model: Any
    """megatron DistributedDataParallel wrapping EncoderDecoderModel"""
    module: Any
    """the EncoderDecoderModel itself"""
    optimizer: Any
    """megatron-core optimizer of the model."""
    scheduler: Any
    """megatron-core learning-rate scheduler of the optimizer."""
    pg_collection: Any
    """The process groups of the run."""
    transformer_config: Any
    """The megatron-core TransformerConfig the model was built from."""


def build(cfg: RunConfig, model_cfg: ModelConfig) -> Built:
    """Process groups, model, DDP wrapper, distributed optimizer and LR scheduler (collective on all ranks)."""
    p: ParallelConfig = cfg.parallel
    # With pipelining the embedding groups hold every stage with a copy of the shared embedding (parallel/groups.py).
    pg = groups.initialize_model_parallel(p)
    groups.model_parallel_manual_seed(cfg.train.seed)
    bf16 = use_bf16(cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    # Pipelining: p2p buffers in the activation dtype; variable_seq_lengths is on (to_transformer_config), so every
    # micro-batch keeps its own source/target lengths.
    tconfig = to_transformer_config(model_cfg, p, **({"pipeline_dtype": dtype} if p.pipeline > 1 else {}))
    tconfig.bf16 = bf16
    tconfig.params_dtype = dtype
    # fairseq's normalisation: the step's loss is the sum over its target tokens (all micro-batches and data-parallel
    # ranks) divided by their count, so a token weighs the same in a short and in a long micro-batch. megatron's
    # schedules then leave the loss unscaled and `finalize_model_grads` divides the gradients by the token count.
    tconfig.calculate_per_token_loss = True
    if p.pipeline > 1:
        module = pipeline.build_stage(model_cfg, p, pg_collection=pg, transformer_config=tconfig,
                                      init_seed=cfg.train.seed)
    else:
        module = EncoderDecoderModel(model_cfg, p, pg_collection=pg, transformer_config=tconfig,
                                     init_seed=cfg.train.seed)
        module.model_type = ModelType.encoder_or_decoder
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    # Before DDP and the optimizer read the marks: one optimizer structure under every expert-parallel size.
    mark_expert_parameters(module)
    if bf16:
        module_for_ddp = Float16Module(tconfig, module)
    else:
        module_for_ddp = module
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optim.distributed_optimizer,
    )
    model = DistributedDataParallel(tconfig, ddp_config, module_for_ddp)
    # megatron's schedules finish the step's gradients with these: data-parallel reduction (DDP's grad sync),
    # sequence-parallel norm/router grads over TP, and the tied embeddings across pipeline stages.
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model.no_sync
    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=bf16, fp16=False,
        params_dtype=tconfig.params_dtype, use_distributed_optimizer=o.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    decay_steps = max(cfg.train.steps, o.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant",
    )
    return Built(model=model, module=module, optimizer=optimizer, scheduler=scheduler, pg_collection=pg,
                 transformer_config=tconfig)
