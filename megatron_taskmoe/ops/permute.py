"""Drop-in `permute` / `unpermute` for megatron-core 0.16.1's `megatron.core.transformer.moe.moe_utils`.

Same signatures, same output order (permute is bitwise equal), same dropless and drop-and-pad semantics; the
[*, H] data moves through row gathers of the compiled extension (or the pure-torch fallback), and both
directions have autograd. Differences that are on purpose:
- unpermute accumulates in fp32 whatever the dtype (megatron sums bf16 tokens in bf16 when no probs are given)
  and reduces per output token in slot order through the inverse mapping: deterministic, no scatter_add/atomics;
- `fused` is accepted and ignored (these kernels are the fused path; Transformer Engine is not needed);
- task-level fast path: when every token has the same routing (task routing over a task-homogeneous
  micro-batch), permute is a view (top-1) or K contiguous copies (top-K) and the matching unpermute of a view is
  a view; no index is built. `fast_path=False` turns it off.

Legend: T tokens, H hidden size, E experts, K experts per token, N permuted rows.
"""

import weakref
from typing import Optional, Tuple

import torch

from megatron_taskmoe.ops.backend import Prims, select_prims


class _PermuteRows(torch.autograd.Function):
    """permuted[j] = tokens[sorted_indices[j]]; backward sums each token's slots (gather-and-sum, fp32)."""

    @staticmethod
    def forward(ctx, tokens_TH, sorted_indices_N, prims):
        ctx.prims = prims
        ctx.num_tokens = tokens_TH.shape[0]
        ctx.save_for_backward(sorted_indices_N)
        return prims.gather_rows(tokens_TH, sorted_indices_N, None)

    @staticmethod
    def backward(ctx, grad_NH):
        (sorted_indices_N,) = ctx.saved_tensors
        row_ptr, slots = ctx.prims.inverse_index(sorted_indices_N, ctx.num_tokens)
        grad_TH = ctx.prims.gather_sum(grad_NH.contiguous(), row_ptr, slots, None, ctx.num_tokens)
        return grad_TH, None, None


class _UnpermuteRows(torch.autograd.Function):
    """out[t] = sum over token t's slots j of permuted[j] (* w[j]), fp32; backward is a gather (and a row dot)."""

    @staticmethod
    def forward(ctx, permuted_NH, sorted_indices_N, weights_N, num_tokens, prims):
        weights_f32 = None if weights_N is None else weights_N.detach().to(torch.float32).contiguous()
        row_ptr, slots = prims.inverse_index(sorted_indices_N, num_tokens)
        out_TH = prims.gather_sum(permuted_NH, row_ptr, slots, weights_f32, num_tokens)
        ctx.prims = prims
        ctx.weights_dtype = None if weights_N is None else weights_N.dtype
        ctx.save_for_backward(sorted_indices_N, permuted_NH if weights_N is not None else None, weights_f32)
        return out_TH

    @staticmethod
    def backward(ctx, grad_TH):
        sorted_indices_N, permuted_NH, weights_f32 = ctx.saved_tensors
        grad_TH = grad_TH.contiguous()
        if weights_f32 is None:
            return ctx.prims.gather_rows(grad_TH, sorted_indices_N, None), None, None, None, None
        grad_NH, grad_w = ctx.prims.unpermute_backward(grad_TH, permuted_NH, sorted_indices_N, weights_f32)
        return grad_NH, None, grad_w.to(ctx.weights_dtype), None, None


def uniform_routing_experts(routing_map_TE: torch.Tensor) -> Optional[torch.Tensor]:
    """The experts (ascending) shared by every token when all rows of the routing map are equal, else None."""
    if routing_map_TE.shape[0] == 0:
        return None
    map_TE = routing_map_TE.bool()
    first_E = map_TE[0]
    if not torch.equal(map_TE, first_E.unsqueeze(0).expand_as(map_TE)):
        return None
    return first_E.nonzero().squeeze(1)


def _check_2d(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    num_out_tokens: Optional[int] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
    *,
    backend: str = "auto",
    fast_path: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Group tokens by expert: (permuted_tokens [N, H], permuted_probs [N] or None, sorted_indices [N]).

    As megatron-core: dropless unless `drop_and_pad` and `num_out_tokens` are both given, in which case every
    expert gets capacity = num_out_tokens // E rows (its routed tokens first, padded with non-routed ones).
    `num_out_tokens` is not used in the dropless case (N is the number of routed pairs).
    """
    del fused  # accepted for signature compatibility; these kernels are the fused path
    _check_2d("tokens", tokens)
    _check_2d("routing_map", routing_map)
    num_tokens = tokens.shape[0]
    num_experts = routing_map.shape[1]
    if routing_map.shape[0] != num_tokens:
        raise ValueError(f"routing_map has {routing_map.shape[0]} rows but tokens has {num_tokens}")
    if probs is not None and tuple(probs.shape) != tuple(routing_map.shape):
        raise ValueError(
            f"probs must have the routing map's shape {tuple(routing_map.shape)}, got {tuple(probs.shape)}"
        )
    prims: Prims = select_prims(backend, tokens)

    if drop_and_pad and num_out_tokens is not None:
        if routing_map.requires_grad:
            raise ValueError("routing_map must not require grad with drop_and_pad")
        capacity = int(num_out_tokens) // num_experts
    else:
        capacity = -1
        if fast_path:
            experts_K = uniform_routing_experts(routing_map)
            if experts_K is not None:
                return _permute_uniform(tokens, probs, experts_K)

    sorted_indices_N, slot_expert_N = prims.permute_index(routing_map, capacity)
    permuted_probs_N = None if probs is None else _gather_probs(probs, sorted_indices_N, slot_expert_N)
    permuted_NH = _PermuteRows.apply(tokens, sorted_indices_N, prims)
    return permuted_NH, permuted_probs_N, sorted_indices_N


def _gather_probs(
    probs_TE: torch.Tensor, tokens_N: torch.Tensor, experts_N: torch.Tensor
) -> torch.Tensor:
    """probs[tokens[j], experts[j]] for every slot j, as one flat index_select (its backward is an index_add into
    zeros, without collisions: each (token, expert) pair occurs once). Several times faster than advanced
    indexing or megatron's transpose + masked_select on CPU."""
    flat_N = tokens_N * probs_TE.shape[1] + experts_N
    return probs_TE.reshape(-1).index_select(0, flat_N)


def _permute_uniform(
    tokens_TH: torch.Tensor, probs_TE: Optional[torch.Tensor], experts_K: torch.Tensor
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Every token goes to the same K experts: expert-major order is the token order repeated K times."""
    num_tokens = tokens_TH.shape[0]
    k = experts_K.numel()
    permuted_NH = tokens_TH.view_as(tokens_TH) if k == 1 else tokens_TH.repeat(k, 1)
    sorted_indices_N = torch.arange(num_tokens, device=tokens_TH.device).repeat(k)
    if k == 1:
        _IDENTITY_INDICES[id(sorted_indices_N)] = sorted_indices_N
    permuted_probs_N = None
    if probs_TE is not None:
        permuted_probs_N = probs_TE.index_select(1, experts_K.to(probs_TE.device)).T.contiguous().view(-1)
    return permuted_NH, permuted_probs_N, sorted_indices_N


# Index tensors the top-1 fast path made (arange(T)), by id: unpermute recognises them without looking at their
# values, which on a GPU would cost a device-to-host synchronisation per call.
_IDENTITY_INDICES: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def _is_identity(sorted_indices_N: torch.Tensor, num_tokens: int) -> bool:
    if sorted_indices_N.numel() != num_tokens:
        return False
    if _IDENTITY_INDICES.get(id(sorted_indices_N)) is sorted_indices_N:
        return True
    # Any other identity order (e.g. tokens already grouped by expert) is found by a scan where that is cheap.
    return sorted_indices_N.device.type == "cpu" and torch.equal(
        sorted_indices_N, torch.arange(num_tokens, device=sorted_indices_N.device)
    )


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape: torch.Size,
    probs: Optional[torch.Tensor] = None,
    routing_map: Optional[torch.Tensor] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
    *,
    backend: str = "auto",
    fast_path: bool = True,
) -> torch.Tensor:
    """Restore token order, summing each token's expert outputs (weighted by `probs` when given) in fp32.

    As megatron-core: with `probs`, `routing_map` is required and the weight of slot j is the probability of
    (its token, its expert) taken in permute's order. The result has `restore_shape` and permuted_tokens' dtype.
    """
    del fused  # accepted for signature compatibility
    _check_2d("permuted_tokens", permuted_tokens)
    if len(restore_shape) != 2 or restore_shape[1] != permuted_tokens.shape[1]:
        raise ValueError(
            f"restore_shape must be [tokens, {permuted_tokens.shape[1]}], got {tuple(restore_shape)}"
        )
    if sorted_indices.dim() != 1 or sorted_indices.numel() != permuted_tokens.shape[0]:
        raise ValueError(
            f"sorted_indices must be 1-D with {permuted_tokens.shape[0]} entries, got {tuple(sorted_indices.shape)}"
        )
    num_tokens = int(restore_shape[0])
    prims: Prims = select_prims(backend, permuted_tokens)

    permuted_probs_N = None
    if probs is not None:
        if routing_map is None:
            raise ValueError("Mask must be provided to permute the probs.")
        if drop_and_pad:
            num_experts = routing_map.size(1)
            capacity = sorted_indices.numel() // num_experts
            slot_expert_N = torch.arange(num_experts, device=probs.device).repeat_interleave(capacity)
            permuted_probs_N = _gather_probs(probs, sorted_indices, slot_expert_N)
        else:
            # megatron: probs.T.contiguous().masked_select(routing_map.T.contiguous()), i.e. the routed pairs of
            # the map in expert-major order, which is what permute_index lists (from the map, not from
            # sorted_indices, so the semantics stay megatron's whatever is passed).
            tokens_N, experts_N = prims.permute_index(routing_map, -1)
            permuted_probs_N = _gather_probs(probs, tokens_N, experts_N)
    elif fast_path and _is_identity(sorted_indices, num_tokens):
        return permuted_tokens.view(restore_shape)

    return _UnpermuteRows.apply(permuted_tokens, sorted_indices, permuted_probs_N, num_tokens, prims)
