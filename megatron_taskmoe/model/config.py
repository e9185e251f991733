"""Configuration of the encoder-decoder model and its parallel layout, and the one conversion to megatron-core.

`ModelConfig` holds sizes, regularization, numerics and (optionally) the MoE part (`moe_config.MoEConfig`, which
also says which FFNs of each side are MoE). `ParallelConfig` holds the tensor/pipeline/expert sizes.
`ParallelConfig.validate(model, world_size)` checks every divisibility megatron would otherwise trip over later
with a less clear message, and `to_transformer_config(model, parallel)` is the single place that maps our fields
onto megatron's `TransformerConfig`.

Legend: D model dim, F FFN dim, V vocabulary, E experts.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from megatron_taskmoe.compat.moe import use_megatron_permute_fusion
from megatron_taskmoe.config_io import from_dict
from megatron_taskmoe.model.moe_config import MoEConfig

ACTIVATIONS = ("relu", "gelu", "swiglu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision names (`ModelConfig.params_dtype`, `--dtype` of the inference and export tools) -> torch dtypes."""
DTYPES = tuple(TORCH_DTYPES)
INIT_METHODS = ("xavier_uniform", "normal")

# Values of fields that records (checkpoint.json, exports) may lack: models saved without them were built this way.
RECORD_DEFAULTS = {"init_method": "normal", "scale_embedding": False}


def _positive(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name}={value!r} must be a positive integer")


def _probability(owner: str, name: str, value) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.{name}={value!r} must be in [0, 1)")


@dataclass(kw_only=True)
class ModelConfig:
    """The encoder-decoder Transformer (pre-norm, shared source/target/output embeddings)."""

    vocab_size: int
    """Real vocabulary size (the sentencepiece model's); the embedding is padded to `padded_vocab_size`."""
    vocab_pad_multiple: int = 128
    """The embedding/output rows are padded to a multiple of this (and of the tensor-parallel size)."""
    hidden_size: int = 512
    """Model width D."""
    ffn_hidden_size: int = 2048
    """Inner width of the dense FFNs."""
    num_attention_heads: int = 8
    """Attention heads of every self- and cross-attention."""
    encoder_layers: int = 6
    """Number of encoder layers."""
    decoder_layers: int = 6
    """Number of decoder layers."""
    max_source_positions: int = 256
    """Learned positions are shared by both sides: the table has max(source, target) rows."""
    max_target_positions: int = 256
    """Longest target sequence in tokens (see max_source_positions)."""
    dropout: float = 0.1
    """Residual and embedding dropout (megatron's hidden_dropout)."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    activation: Literal["relu", "gelu", "swiglu"] = "relu"
    """FFN activation; "swiglu" is the gated form."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """Which norm the model uses."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the norms."""
    bias: bool = False
    """Biases in attention/FFN linears. megatron-core 0.16.1's MoE experts cannot take biases (an in-place add on
    a view in `MLP.forward` fails under autograd), so this must stay False when there are MoE layers."""
    init_method: Literal["xavier_uniform", "normal"] = "xavier_uniform"
    """How weights start. "xavier_uniform" (fairseq's Transformer): every weight matrix Xavier-uniform over its full,
    unsharded shape, token and position embeddings N(0, hidden_size**-0.5), biases zero. "normal" (megatron's GPT
    recipe): every matrix and embedding N(0, init_std), the output projections of attention and FFN
    N(0, init_std / sqrt(2 * num_layers)). Task embedding tables are N(0, 1) and adapter up-projections zero in
    both."""
    init_std: float = 0.02
    """The standard deviation of init_method="normal"."""
    scale_embedding: bool = True
    """Multiply token embeddings by sqrt(hidden_size) before the learned positions are added (fairseq's and
    CTranslate2's `scale_embeddings`); with init_method="xavier_uniform" a token's embedding then has unit scale."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy loss; 0 disables it."""
    pad_id: int = 0
    """Piece id of padding; padded token and label positions hold it."""
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the parameters."""
    moe: Optional[MoEConfig] = None
    """None: a dense model. Otherwise the MoE layers, their routing per side and the task adapters."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        owner = "ModelConfig"
        for name in ("vocab_size", "vocab_pad_multiple", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "max_source_positions", "max_target_positions"):
            _positive(owner, name, getattr(self, name))
        for name in ("encoder_layers", "decoder_layers"):
            _positive(owner, name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        _probability(owner, "dropout", self.dropout)
        _probability(owner, "attention_dropout", self.attention_dropout)
        _probability(owner, "label_smoothing", self.label_smoothing)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation={self.activation!r} is not one of {ACTIVATIONS}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"ModelConfig.normalization={self.normalization!r} is not one of {NORMALIZATIONS}")
        if self.init_method not in INIT_METHODS:
            raise ValueError(f"ModelConfig.init_method={self.init_method!r} is not one of {INIT_METHODS}")
        if not self.init_std > 0:
            raise ValueError(f"ModelConfig.init_std={self.init_std!r} must be > 0")
        if self.params_dtype not in DTYPES:
            raise ValueError(f"ModelConfig.params_dtype={self.params_dtype!r} is not one of {DTYPES}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"ModelConfig.pad_id={self.pad_id} is outside the vocabulary of {self.vocab_size}")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ValueError(f"ModelConfig.moe must be a MoEConfig or None, got {type(self.moe).__name__}")
            self.moe.validate()
            if self.bias and self.num_moe_layers() > 0:
                raise ValueError(
                    "ModelConfig.bias=True with MoE layers: megatron-core 0.16.1's experts do not support biases"
                )

    # ---- derived sizes -------------------------------------------------------------------------------------
    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of lcm(vocab_pad_multiple, tensor_parallel)."""
        multiple = math.lcm(self.vocab_pad_multiple, tensor_parallel)
        return -(-self.vocab_size // multiple) * multiple

    @property
    def max_positions(self) -> int:
        return max(self.max_source_positions, self.max_target_positions)

    @property
    def num_layers(self) -> int:
        """All layers, encoder then decoder (megatron numbers them 1..num_layers in that order)."""
        return self.encoder_layers + self.decoder_layers

    def moe_pattern(self, side: str) -> list[int]:
        """One entry per layer of `side` ("encoder"/"decoder"): 1 where the FFN is an MoE layer."""
        if side not in ("encoder", "decoder"):
            raise ValueError(f"side={side!r} must be 'encoder' or 'decoder'")
        num = self.encoder_layers if side == "encoder" else self.decoder_layers
        if self.moe is None:
            return [0] * num
        return self.moe.side(side).moe_layer_pattern(num)

    def num_moe_layers(self) -> int:
        return sum(self.moe_pattern("encoder")) + sum(self.moe_pattern("decoder"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.params_dtype]

    @property
    def embedding_scale(self) -> float:
        """The factor token embeddings are multiplied by (sqrt(hidden_size) or 1)."""
        return math.sqrt(self.hidden_size) if self.scale_embedding else 1.0

    @classmethod
    def from_record(cls, record: dict, prefix: str = "model_config.") -> "ModelConfig":
        """The model a saved record (`to_dict` of a ModelConfig, in checkpoint.json or an export) describes; fields
        the record lacks take `RECORD_DEFAULTS`, the values such models were built with."""
        return from_dict(cls, {**RECORD_DEFAULTS, **record}, prefix=prefix)


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is split over processes; data parallelism takes what is left of the world size."""

    tensor: int = 1
    """Tensor-parallel size: attention heads and FFN columns split over this many ranks."""
    pipeline: int = 1
    """Pipeline-parallel size: stages of layers (encoder stages first, see `encoder_pipeline_stages`)."""
    expert: int = 1
    """Expert-parallel size: the experts of each MoE layer split over this many ranks."""
    expert_tensor: Optional[int] = None
    """Tensor parallelism inside experts; None means megatron's default (same as `tensor`)."""
    sequence_parallel: Optional[bool] = None
    """None: on when tensor > 1 (megatron requires it for MoE with tensor parallelism)."""
    encoder_pipeline_stages: Optional[int] = None
    """With pipeline > 1: how many leading stages hold the encoder (the rest hold the decoder)."""

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "expert"):
            _positive("ParallelConfig", name, getattr(self, name))
        if self.expert_tensor is not None:
            _positive("ParallelConfig", "expert_tensor", self.expert_tensor)

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tensor > 1 if self.sequence_parallel is None else self.sequence_parallel

    def data(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline)

    def validate(self, model: ModelConfig, world_size: Optional[int] = None) -> None:
        """Every divisibility the layout needs, with the option names in the message."""
        tp, pp, ep = self.tensor, self.pipeline, self.expert
        if model.num_attention_heads % tp:
            raise ValueError(
                f"ModelConfig.num_attention_heads={model.num_attention_heads} is not divisible by "
                f"ParallelConfig.tensor={tp}"
            )
        if model.ffn_hidden_size % tp:
            raise ValueError(
                f"ModelConfig.ffn_hidden_size={model.ffn_hidden_size} is not divisible by ParallelConfig.tensor={tp}"
            )
        if self.sequence_parallel is False and tp > 1 and model.num_moe_layers() > 0:
            raise ValueError("ParallelConfig.sequence_parallel=False with tensor > 1 and MoE layers: megatron "
                             "requires sequence parallelism for MoE with tensor parallelism")
        if self.use_sequence_parallel and tp == 1:
            raise ValueError("ParallelConfig.sequence_parallel=True needs ParallelConfig.tensor > 1")
        if model.moe is not None and model.num_moe_layers() > 0 and model.moe.num_experts % ep:
            raise ValueError(
                f"MoEConfig.num_experts={model.moe.num_experts} is not divisible by ParallelConfig.expert={ep}"
            )
        if model.moe is not None:
            for side in ("encoder", "decoder"):
                experts = model.moe.side(side).num_experts
                if experts is not None and sum(model.moe_pattern(side)) > 0 and experts % ep:
                    raise ValueError(f"MoEConfig.{side}.num_experts={experts} is not divisible by "
                                     f"ParallelConfig.expert={ep}")
        if ep > 1 and model.num_moe_layers() == 0:
            raise ValueError(f"ParallelConfig.expert={ep} > 1 but the model has no MoE layers")
        self._validate_encoder_stages()
        if pp > 1:
            enc, dec = self.encoder_pipeline_stages, pp - self.encoder_pipeline_stages
            if model.encoder_layers % enc or model.decoder_layers % dec:
                raise ValueError(
                    f"ModelConfig.encoder_layers={model.encoder_layers} / decoder_layers={model.decoder_layers} "
                    f"are not divisible by their pipeline stages {enc} / {dec} (ParallelConfig.pipeline={pp}, "
                    f"encoder_pipeline_stages={enc})"
                )
        if world_size is not None:
            self.validate_world_size(world_size)

    def _validate_encoder_stages(self) -> None:
        pp = self.pipeline
        if pp > 1 and (self.encoder_pipeline_stages is None or not 1 <= self.encoder_pipeline_stages < pp):
            raise ValueError(
                f"ParallelConfig.pipeline={pp}: encoder_pipeline_stages must be in [1, {pp - 1}], "
                f"got {self.encoder_pipeline_stages}"
            )
        if pp == 1 and self.encoder_pipeline_stages not in (None, 0):
            raise ValueError("ParallelConfig.encoder_pipeline_stages is only meaningful with pipeline > 1")

    def validate_world_size(self, world_size: int) -> None:
        """The checks that need only the sizes and the world size (the one place they are made): the pipeline
        split, tensor x pipeline dividing the world, and expert x expert-tensor dividing data x tensor."""
        self._validate_encoder_stages()
        tp, pp, ep = self.tensor, self.pipeline, self.expert
        if world_size % (tp * pp):
            raise ValueError(
                f"world size {world_size} is not divisible by ParallelConfig.tensor x ParallelConfig.pipeline = "
                f"{tp} x {pp}"
            )
        dp = world_size // (tp * pp)
        etp = tp if self.expert_tensor is None else self.expert_tensor
        if (dp * tp) % (ep * etp):
            raise ValueError(
                f"ParallelConfig.expert x expert_tensor = {ep} x {etp} must divide data x tensor parallel = "
                f"{dp} x {tp} (world size {world_size}, ParallelConfig.pipeline={pp})"
            )


_ACTIVATION_FUNCS = {"relu": F.relu, "gelu": F.gelu, "swiglu": F.silu}


def xavier_uniform_init(tensor: torch.Tensor) -> torch.Tensor:
    """Xavier-uniform for a weight matrix, zero for a vector (a bias). megatron calls init methods on the full
    master weight (`use_cpu_initialization`), so the fans are the unsharded ones under every parallel layout."""
    if tensor.dim() < 2:
        return torch.nn.init.zeros_(tensor)
    return torch.nn.init.xavier_uniform_(tensor)


def init_methods(model: ModelConfig) -> dict:
    """`TransformerConfig`'s init fields for `model.init_method` (module-level callables, so configs pickle)."""
    if model.init_method == "normal":
        return dict(init_method_std=model.init_std)
    return dict(
        init_method=xavier_uniform_init,
        output_layer_init_method=xavier_uniform_init,
        embedding_init_method=functools.partial(torch.nn.init.normal_, mean=0.0, std=model.hidden_size ** -0.5),
    )


def to_transformer_config(model: ModelConfig, parallel: Optional[ParallelConfig] = None, **overrides):
    """The megatron-core `TransformerConfig` for `model` laid out as `parallel` (the only conversion).

    CPU-safe settings are always used (CPU initialization, no fused kernels but the MoE permutation's where
    `MoEConfig.permute_backend="auto"` finds Transformer Engine's on a GPU): megatron's fusions need CUDA or
    Apex/TE, and CPU initialization builds the full weight on every rank before slicing it, so every layout starts
    from the same numbers for the same seed. `overrides` go to `TransformerConfig` last (for experiments)."""
    # megatron-core only when called: model.config (imported by the configs, the checkpoint record and serving)
    # imports without it
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel = parallel or ParallelConfig()
    parallel.validate(model)
    dtype = model.torch_dtype
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        hidden_dropout=model.dropout,
        attention_dropout=model.attention_dropout,
        activation_func=_ACTIVATION_FUNCS[model.activation],
        gated_linear_unit=model.activation == "swiglu",
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        add_bias_linear=model.bias,
        add_qkv_bias=model.bias,
        **init_methods(model),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor,
        sequence_parallel=parallel.use_sequence_parallel,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        variable_seq_lengths=parallel.pipeline > 1,
    )
    if model.moe is not None and model.num_moe_layers() > 0:
        kwargs.update(model.moe.megatron_kwargs())
        # megatron's fused permutation (GPU, Transformer Engine) where "auto" takes it; see model/specs.py.
        kwargs["moe_permute_fusion"] = use_megatron_permute_fusion(model.moe.permute_backend)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def side_transformer_config(config, model: ModelConfig, side: str):
    """The `TransformerConfig` of `side`'s block: `config` itself, or a copy with that side's expert count when
    `RoutingConfig.num_experts` overrides it (megatron's MoELayer and router take E from their config)."""
    if model.moe is None or model.moe.side(side).num_experts in (None, config.num_moe_experts):
        return config
    side_config = copy.copy(config)
    side_config.num_moe_experts = model.moe.side(side).num_experts
    return side_config
