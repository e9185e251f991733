"""MoE APIs that differ between the supported megatron-core releases: the token permutation, where the all-to-all
dispatcher runs overlapped shared experts, and the fused (Transformer Engine) permutation.

* `moe_utils.permute`: 3 results up to 0.16, 5 from 0.17 (plus pad offsets and tokens per expert for the fused
  permute-and-pad); `mcore_permute` returns the first 3 on every release.
* Shared experts under the all-to-all dispatcher: megatron moved their fc1 into `token_dispatch` and their fc2 into
  `token_combine` in 0.18 (`shared_experts_run_in_token_comm()`).
* The fused permutation on GPU (`moe_permute_fusion`): megatron's own, through Transformer Engine's kernels, in every
  supported release; from 0.17 megatron also uses TE's fused permute-and-pad where FP8/FP4 padding asks for it.
  `megatron_permute_fusion_available()` says whether this machine has it.

`moe_utils` is imported inside the functions, so that importing this module (model configs do) does not import
megatron-core.
"""

from __future__ import annotations

import torch

from megatron_taskmoe.compat.versions import mcore_at_least


def mcore_permute(tokens: torch.Tensor, routing_map: torch.Tensor, **kwargs):
    """megatron's `moe_utils.permute`: (permuted tokens, permuted probs or None, sorted indices) on every release.

    Without `num_out_tokens` megatron permutes every routed pair (its drop-and-pad path needs the count), which
    0.19's argsort-based permute does only when given that count: it is passed explicitly."""
    from megatron.core.transformer.moe import moe_utils  # here, not at the top: see the module docstring

    if kwargs.get("num_out_tokens") is None:
        kwargs.update(num_out_tokens=int(routing_map.sum()), drop_and_pad=False)
    return tuple(moe_utils.permute(tokens, routing_map, **kwargs)[:3])


def shared_experts_run_in_token_comm() -> bool:
    """Whether megatron's all-to-all dispatcher runs the overlapped shared experts' fc1 in `token_dispatch` and their
    fc2 in `token_combine` (0.18 and later) rather than in `dispatch_postprocess` / `combine_postprocess`."""
    return mcore_at_least("0.18.0")


def megatron_permute_fusion_available() -> bool:
    """Whether megatron's fused permutation (`moe_permute_fusion`, Transformer Engine's kernels) can run here:
    CUDA, and a Transformer Engine that provides the fused permute, unpermute and chunk-sort kernels."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.transformer.moe import moe_utils  # here, not at the top: see the module docstring

    needed = ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
              "fused_sort_chunks_by_index_with_probs", "fused_unpermute")
    return all(getattr(moe_utils, name, None) is not None for name in needed)


def use_megatron_permute_fusion(permute_backend: str) -> bool:
    """Whether MoE layers with `MoEConfig.permute_backend` take megatron's own dispatcher with its fused
    permutation (`moe_permute_fusion`) instead of ours: for "auto" where `megatron_permute_fusion_available()`.
    "extension" and "torch" always mean our dispatcher and megatron's unfused dispatcher."""
    return permute_backend == "auto" and megatron_permute_fusion_available()

