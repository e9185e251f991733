"""The shared source/target embedding: megatron-core's `LanguageModelEmbedding` with fairseq's token scaling.

Token embeddings are multiplied by `scale` (sqrt(d) with `ModelConfig.scale_embedding`) before the learned
positions are added, as fairseq's and CTranslate2's Transformers do. The scale is applied to the output of the
vocab-parallel lookup (after its tensor-parallel reduction), so it is the same under every layout, and the tied
output projection, which reads the table's weight, is unaffected.

With gradients disabled, in eval mode, on one tensor-parallel rank and without sequence parallelism (decoding and
validation on one device), the forward is megatron's arithmetic (lookup, scale, + positions, [B, X] -> [X, B]) without
its per-call autograd functions and process-group lookups: a decoding step embeds one token per hypothesis, where
that bookkeeping cost more than the lookup. Everything else keeps megatron's forward.

Legend: B batch, X sequence length, D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tokentype_ids=None) -> torch.Tensor:
        """Embeddings [X, B, D] of `input_ids` [B, X] at `position_ids` [B, X]."""
        if not self._plain_inference(tokentype_ids):
            return super().forward(input_ids, position_ids, tokentype_ids)
        tokens_BXD = F.embedding(input_ids, self.word_embeddings.weight)
        if self.scale != 1.0:
            tokens_BXD = tokens_BXD * self.scale
        if self.add_position_embedding:
            tokens_BXD = tokens_BXD + F.embedding(position_ids, self.position_embeddings.weight)
        return tokens_BXD.transpose(0, 1).contiguous()

    def _plain_inference(self, tokentype_ids) -> bool:
        """True where megatron's forward reduces to lookup, scale, + positions and a transpose (see the module
        docstring): no gradient, no dropout, one rank, none of the options that change the arithmetic."""
        config = self.config
        return not (torch.is_grad_enabled() or self.training or tokentype_ids is not None
                    or self.word_embeddings.tp_group.size() > 1 or config.sequence_parallel
                    or self.reduce_scatter_embeddings or config.fp32_residual_connection
                    or getattr(config, "use_mup", False))
