"""The run configuration of `pretrain_mt.py`: one YAML file (examples/configs/) plus `--set key=value` overrides.

Sections, each a small dataclass validated on construction:

    model       a named preset (system x size, model/presets.py) plus field overrides
    parallel    tensor / pipeline / expert sizes (data parallel takes the rest of the world)
    data        the preprocessed directory, temperature, micro-batching (`data.batching`, data/batching.py)
    optim       AdamW, learning-rate schedule, clipping
    train       steps, micro-batches per step, seed, logging, NaN policy, run directory
    checkpoint  interval, retention, where to resume from
    eval        validation interval, decoding (`eval.search`, generation.py), early stopping

`RunConfig.validate_against(world_size, manifest)` checks what needs the launch and the data (parallel sizes, task
counts), before any model is built.

Moved keys load (`MOVED_KEYS` of a section, config_io.py): `data.max_tokens`,
`data.pad_to_multiple`, `data.task_homogeneous` are read as `data.batching.*`, and `eval.beam_size`,
`eval.length_penalty`, `eval.max_len_a`, `eval.max_len_b` as `eval.search.*`, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from megatron_taskmoe.config_io import ConfigError, from_dict, to_dict
from megatron_taskmoe.data.batching import BatchingConfig
from megatron_taskmoe.generation import SearchConfig
from megatron_taskmoe.model import presets
from megatron_taskmoe.model.config import ModelConfig, ParallelConfig


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(kw_only=True)
class ModelSection:
    """A preset (`system` at `size`) with `overrides` of `ModelConfig` fields (nested for `moe`)."""

    system: str = "moe_task_shared_dynamic"
    """The system: a key of model/presets.py PRESETS (dense, MoE, task MoE, adapters...)."""
    size: str = "tiny"
    """The size: a key of model/presets.py SIZES."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """`ModelConfig` fields replacing the preset's (nested mappings for `moe`)."""

    def __post_init__(self):
        if self.system not in presets.PRESETS:
            raise ValueError(f"model.system={self.system!r} is not one of {list(presets.PRESETS)}")
        if self.size not in presets.SIZES:
            raise ValueError(f"model.size={self.size!r} is not one of {list(presets.SIZES)}")

    def build(self, *, vocab_size: int, num_tasks: int, num_languages: int) -> ModelConfig:
        """The model for a corpus: the tokenizer's vocabulary and the manifest's task/language counts."""
        base = presets.get(self.system, self.size, num_tasks=num_tasks, num_languages=num_languages,
                           vocab_size=vocab_size)
        merged = _deep_merge(to_dict(base), self.overrides)
        if "vocab_size" in self.overrides and self.overrides["vocab_size"] != vocab_size:
            raise ConfigError(f"model.overrides.vocab_size={self.overrides['vocab_size']} disagrees with the "
                              f"tokenizer's {vocab_size} pieces")
        return from_dict(ModelConfig, merged, prefix="model.overrides.")


@dataclass(kw_only=True)
class DataSection:
    """The preprocessed corpus, the sampling of its directions and the micro-batching."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {"max_tokens": "batching.max_tokens",
                                            "pad_to_multiple": "batching.pad_to_multiple",
                                            "task_homogeneous": "batching.task_homogeneous"}
    """Moved keys this section still reads: key -> its dotted path within the section (read there, with a warning;
    config_io.py)."""

    data_dir: str = ""
    """A directory written by tools/preprocess_data.py (has manifest.json)."""
    directions: Optional[list[str]] = None
    """Directions to train on (e.g. ["de-en", "en-de"]); None means all in the manifest."""
    temperature: float = 5.0
    """Sampling probability of a direction is proportional to n**(1/temperature)."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """How micro-batches are formed: token budget, padding, task-homogeneous batches (data/batching.py); their
    order is seeded by `train.seed`. Validation batches use its token budget (or batch size) and padding."""
    valid_split: str = "valid"
    """The split validated on (on the fly, every `eval.interval` steps)."""
    test_split: str = "test"
    """The name of the test split (training does not read it; tools/evaluate.py takes `--split`)."""

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"data.temperature must be > 0, got {self.temperature}")
        if self.batching.max_tokens is not None and self.batching.max_tokens < 8:
            raise ValueError(f"data.batching.max_tokens must be >= 8, got {self.batching.max_tokens}")


@dataclass(kw_only=True)
class OptimSection:
    """AdamW and its learning-rate schedule (megatron-core's optimizer and OptimizerParamScheduler)."""

    lr: float = 5e-4
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float = 0.0
    """The floor the schedule decays to."""
    warmup_steps: int = 100
    """Steps of linear warm-up from 0 to `lr`."""
    decay_style: Literal["inverse-square-root", "cosine", "linear", "constant"] = "inverse-square-root"
    """The decay after the warm-up."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.98
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    distributed_optimizer: bool = True
    """megatron-core's distributed optimizer: optimizer state sharded over data-parallel ranks."""

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= lr (lr={self.lr}, min_lr={self.min_lr})")
        if self.warmup_steps < 0 or self.clip_grad < 0:
            raise ValueError("optim.warmup_steps and optim.clip_grad must be >= 0")


@dataclass(kw_only=True)
class TrainSection:
    """The length of the run, its seed, logging and where it writes."""

    steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues up to it)."""
    micro_batches: int = 1
    """Micro-batches per step on each data-parallel rank (gradient accumulation; the 1F1B depth with pipelining)."""
    seed: int = 1234
    """Seeds the weights, dropout and the data order (sampler and batching)."""
    log_interval: int = 10
    """Write a `train` record (loss, learning rate, gradient norm, tokens/s) every N steps."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss: stop with a message naming the step, or skip that step's update."""
    run_dir: str = "runs/default"
    """Receives the resolved config, metrics.jsonl, TensorBoard logs and checkpoints."""
    bf16: Optional[bool] = None
    """None: bf16 on GPU, fp32 on CPU."""
    progress_bar: bool = True
    """A tqdm progress bar on rank 0."""
    routing_stats: bool = True
    """Routing telemetry: per MoE layer, every log_interval steps, a `routing` record in metrics.jsonl and
    TensorBoard (expert load, drops, entropy, per-task expert and adapter use; training/routing_telemetry.py)."""
    routing_collapse_share: float = 0.9
    """Warn that a layer collapsed when one expert is chosen by at least this share of its tokens, or a dynamic
    adapter gate sends at least this share of every task's tokens to one adapter."""

    def __post_init__(self):
        if self.steps < 1 or self.micro_batches < 1 or self.log_interval < 1:
            raise ValueError("train.steps, train.micro_batches and train.log_interval must be >= 1")
        if not 0 < self.routing_collapse_share <= 1:
            raise ValueError(f"train.routing_collapse_share={self.routing_collapse_share} must be in (0, 1]")


@dataclass(kw_only=True)
class CheckpointSection:
    """When checkpoints are written, how many are kept, where a run starts from."""

    interval: int = 500
    """Save every N steps (and at every validation, with its BLEU as the metric)."""
    keep_last: int = 2
    """The most recent checkpoints kept."""
    keep_best: int = 1
    """The best checkpoints by validation BLEU kept besides the most recent ones."""
    load: Optional[str] = "auto"
    """"auto": resume from run_dir/checkpoints if there is one; a path: start from that checkpoint; None: fresh."""
    save: bool = True
    """False: write no checkpoints (e.g. a smoke test)."""

    def __post_init__(self):
        if self.interval < 1 or self.keep_last < 1 or self.keep_best < 0:
            raise ValueError("checkpoint.interval and keep_last must be >= 1, keep_best >= 0")


@dataclass(kw_only=True)
class EvalSection:
    """On-the-fly validation: how often, how many sentences, the decoding, early stopping."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {"beam_size": "search.beam_size",
                                            "length_penalty": "search.length_penalty",
                                            "max_len_a": "search.max_len_a", "max_len_b": "search.max_len_b"}
    """Moved keys this section still reads: key -> its dotted path within the section (read there, with a warning;
    config_io.py)."""

    interval: int = 500
    """Validate every N steps (and at the end); 0 disables on-the-fly validation."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """The decoding of the validation translations (generation.py; greedy by default)."""
    max_sentences: int = 200
    """Validation sentences per direction for BLEU (all for the loss is not needed: the same subset is used)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations (every `interval` steps) without a better average BLEU; 0 disables. Pham et
    al. stop after 2 epochs without improvement: with `interval` the steps of an epoch, 2 is their rule."""
    bleu_tokenize: Optional[str] = None
    """sacrebleu tokenizer for validation BLEU (e.g. "flores200"); None: by target language (13a, zh, ja-mecab,
    ko-mecab; evaluation.bleu_tokenizer)."""

    def __post_init__(self):
        if self.interval < 0 or self.max_sentences < 1 or self.early_stopping_patience < 0:
            raise ValueError("eval.interval >= 0, eval.max_sentences >= 1, eval.early_stopping_patience >= 0")


@dataclass(kw_only=True)
class RunConfig:
    """The whole run (see the module docstring)."""

    model: ModelSection = field(default_factory=ModelSection)
    """The model: a preset and field overrides."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / expert parallel sizes (model/config.py)."""
    data: DataSection = field(default_factory=DataSection)
    """The corpus and its micro-batches."""
    optim: OptimSection = field(default_factory=OptimSection)
    """The optimizer and learning-rate schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """Steps, seed, logging, run directory."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoint interval, retention, resume."""
    eval: EvalSection = field(default_factory=EvalSection)
    """On-the-fly validation and early stopping."""

    def validate_against(self, world_size: int, model: ModelConfig) -> None:
        """Checks that need the launch (world size) and the built model config; raises ConfigError."""
        p = self.parallel
        try:
            p.validate(model, world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if p.pipeline > 1 and self.train.micro_batches < p.pipeline:
            raise ConfigError(f"train.micro_batches={self.train.micro_batches} should be >= parallel.pipeline="
                              f"{p.pipeline} to fill the pipeline")

