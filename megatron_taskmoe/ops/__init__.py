"""Token permutation for MoE dispatch: a C++/CUDA extension with a pure-torch fallback, and token dispatchers.

`permute` / `unpermute` are drop-in for megatron-core's `moe_utils.permute` / `unpermute` (plus keyword-only
`backend=` and `fast_path=`); `build_token_dispatcher` gives megatron's all-gather or all-to-all dispatcher with
these kernels in its permutation steps.
"""

from megatron_taskmoe.ops.backend import BACKENDS, extension_available, extension_has_cuda, resolved_backend
from megatron_taskmoe.ops.permute import permute, uniform_routing_experts, unpermute

__all__ = [
    "BACKENDS",
    "extension_available",
    "extension_has_cuda",
    "permute",
    "resolved_backend",
    "uniform_routing_experts",
    "unpermute",
]
