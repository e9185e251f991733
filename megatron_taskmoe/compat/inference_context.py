"""Inference contexts (the decoder's key/value cache is one) across the supported megatron-core releases:
`BaseInferenceContext.__init__` takes the `materialize_only_last_token_logits` flag in 0.16, an `InferenceConfig`
carrying it from 0.17 (`init_inference_context`). `InferenceConfig` exists only from 0.17, hence its import inside
the function."""

from __future__ import annotations

from megatron.core.inference.contexts.base_context import BaseInferenceContext

from megatron_taskmoe.compat.versions import mcore_at_least


def init_inference_context(context, *, materialize_only_last_token_logits: bool = True) -> None:
    """Run `BaseInferenceContext.__init__` on `context`: in 0.16 it takes the `materialize_only_last_token_logits`
    flag itself, from 0.17 an `InferenceConfig` that carries it (read as `context.config.<flag>`)."""
    if mcore_at_least("0.17.0"):
        from megatron.core.inference.config import InferenceConfig  # megatron-core >= 0.17 only

        config = InferenceConfig(materialize_only_last_token_logits=materialize_only_last_token_logits)
        BaseInferenceContext.__init__(context, config)
    else:
        BaseInferenceContext.__init__(
            context, materialize_only_last_token_logits=materialize_only_last_token_logits)
