"""LayerNorm / RMSNorm usable under sequence parallelism, for megatron-core layer specs.

megatron-core's torch fallback (`WrappedTorchNorm`) refuses sequence parallelism, and megatron insists on sequence
parallelism for MoE with tensor parallelism > 1. Under sequence parallelism each tensor-parallel rank normalizes a
different slice of the sequence, so a norm's weight gradient is a partial sum on each rank; marking the parameters
`sequence_parallel` makes megatron's `finalize_model_grads` all-reduce them over the tensor-parallel group. The maths
is torch's own (`F.layer_norm`, `F.rms_norm`).

Legend: D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


class SequenceParallelNorm(MegatronModule):
    """`config.normalization` ("LayerNorm" or "RMSNorm") over the last dim; params marked `sequence_parallel`.

    Built by megatron's `build_module(spec, config=..., hidden_size=..., eps=...)` like its own norms."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config=config)
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={config.normalization!r} is not one of {NORMALIZATIONS}")
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("layernorm_zero_centered_gamma is not supported by SequenceParallelNorm")
        self.kind = config.normalization
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if self.kind == "LayerNorm"
            else None
        )
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        if self.kind == "LayerNorm":
            return F.layer_norm(x_D, (self.hidden_size,), self.weight, self.bias, self.eps)
        return F.rms_norm(x_D, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.kind}({self.hidden_size}, eps={self.eps}, sequence_parallel={self.config.sequence_parallel})"
