"""Token permutation for MoE dispatch: a C++/CUDA extension with a pure-torch fallback, and token dispatchers.

`permute` / `unpermute` are drop-in for megatron-core's `moe_utils.permute` / `unpermute` (plus keyword-only
`backend=` and `fast_path=`); `build_token_dispatcher` gives megatron's all-gather or all-to-all dispatcher with
these kernels in its permutation steps.
"""

from megatron_taskmoe.ops.backend import (
    BACKENDS,
    empty_output_cache,
    extension_available,
    extension_has_cuda,
    output_cache_stats,
    resolved_backend,
    set_output_cache_limit,
)
from megatron_taskmoe.ops.permute import permute, uniform_routing_experts, unpermute

__all__ = [
    "BACKENDS",
    "empty_output_cache",
    "extension_available",
    "extension_has_cuda",
    "output_cache_stats",
    "permute",
    "resolved_backend",
    "set_output_cache_limit",
    "uniform_routing_experts",
    "unpermute",
]
