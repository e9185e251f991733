"""The shared source/target embedding: megatron-core's `LanguageModelEmbedding` with fairseq's token scaling.

Token embeddings are multiplied by `scale` (sqrt(d) with `ModelConfig.scale_embedding`) before the learned
positions are added, as fairseq's and CTranslate2's Transformers do. The scale is applied to the output of the
vocab-parallel lookup (after its tensor-parallel reduction), so it is the same under every layout, and the tied
output projection, which reads the table's weight, is unaffected.

Legend: B batch, X sequence length, D model dim.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding


class ScaledEmbedding(LanguageModelEmbedding):
    """`LanguageModelEmbedding` whose token embeddings are multiplied by `scale` before positions are added."""

    def __init__(self, *args, scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = float(scale)
        if self.scale != 1.0:
            self.word_embeddings.register_forward_hook(self._scale_tokens)

    def _scale_tokens(self, module: torch.nn.Module, inputs, tokens_BXD: torch.Tensor) -> torch.Tensor:
        return tokens_BXD * self.scale
