"""Pure-torch versions of the five permutation primitives, with the same contracts as the C++/CUDA operators.

Used when the extension is not built (or cannot take the device/dtype), and as the reference the extension is
tested against. Deterministic on every device: the reduction over a token's slots runs rank by rank (the r-th
slot of every token at once), so each `index_add_` touches every output row at most once and no two additions
race.

Legend: T tokens, H hidden size, E experts, N permuted rows.
"""

from typing import Optional, Tuple

import torch


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/bf16/fp16, fp64 for fp64 (ATen's opmath_type)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def permute_index(routing_map_TE: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sorted_indices_N, slot_expert_N) in megatron-core's order.

    Dropless (capacity < 0): expert-major, routed tokens ascending. Drop-and-pad: per expert, routed tokens
    ascending then non-routed tokens ascending (a stable descending argsort of the column), first
    min(capacity, T) of them.
    """
    if routing_map_TE.dim() != 2:
        raise ValueError(f"routing_map must be 2-D [tokens, experts], got shape {tuple(routing_map_TE.shape)}")
    num_tokens, num_experts = routing_map_TE.shape
    device = routing_map_TE.device
    if capacity < 0:
        # (expert, token) pairs of the [E, T] map in row-major order: expert-major, tokens ascending.
        pairs_N2 = routing_map_TE.bool().T.nonzero()
        return pairs_N2[:, 1].contiguous(), pairs_N2[:, 0].contiguous()
    cap = min(capacity, num_tokens)
    map_ET = routing_map_TE.to(torch.int8).T.contiguous()
    sorted_EC = map_ET.argsort(dim=-1, descending=True, stable=True)[:, :cap]
    slot_expert = torch.arange(num_experts, device=device).repeat_interleave(cap)
    return sorted_EC.contiguous().view(-1), slot_expert


def inverse_index(sorted_indices_N: torch.Tensor, num_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """CSR inverse (row_ptr_T1, slots_N): token t's slots, ascending, are slots[row_ptr[t]:row_ptr[t+1]]."""
    if sorted_indices_N.numel() and (
        int(sorted_indices_N.min()) < 0 or int(sorted_indices_N.max()) >= num_tokens
    ):
        raise IndexError(f"sorted_indices has entries outside [0, {num_tokens})")
    counts_T = torch.bincount(sorted_indices_N, minlength=num_tokens)
    row_ptr = torch.zeros(num_tokens + 1, dtype=torch.long, device=sorted_indices_N.device)
    row_ptr[1:] = counts_T.cumsum(0)
    slots = torch.sort(sorted_indices_N, stable=True).indices
    return row_ptr, slots


def gather_rows(
    src_MH: torch.Tensor, indices_N: torch.Tensor, weights_N: Optional[torch.Tensor]
) -> torch.Tensor:
    """out[j] = src[indices[j]] (* weights[j] in fp32)."""
    rows_NH = src_MH.index_select(0, indices_N)
    if weights_N is None:
        return rows_NH
    acc = _opmath_dtype(src_MH.dtype)
    return (rows_NH.to(acc) * weights_N.to(acc).unsqueeze(-1)).to(src_MH.dtype)


def gather_sum(
    src_NH: torch.Tensor,
    row_ptr_T1: torch.Tensor,
    slots_N: torch.Tensor,
    weights_N: Optional[torch.Tensor],
    num_tokens: int,
) -> torch.Tensor:
    """out[t] = sum of src[s] (* weights[s]) over token t's slots, in slot order, fp32 accumulation."""
    acc = _opmath_dtype(src_NH.dtype)
    out_TH = torch.zeros(num_tokens, src_NH.shape[1], dtype=acc, device=src_NH.device)
    num_slots = slots_N.numel()
    if num_slots == 0:
        return out_TH.to(src_NH.dtype)
    counts_T = row_ptr_T1.diff()
    token_of_pos = torch.repeat_interleave(torch.arange(num_tokens, device=src_NH.device), counts_T)
    rank_of_pos = torch.arange(num_slots, device=src_NH.device) - row_ptr_T1[token_of_pos]
    for rank in range(int(counts_T.max())):
        pos = (rank_of_pos == rank).nonzero().squeeze(1)
        slot = slots_N[pos]
        rows = src_NH.index_select(0, slot).to(acc)
        if weights_N is not None:
            rows = rows * weights_N[slot].to(acc).unsqueeze(-1)
        out_TH.index_add_(0, token_of_pos[pos], rows)  # distinct tokens within one rank: no collisions
    return out_TH.to(src_NH.dtype)


def unpermute_backward(
    grad_out_TH: torch.Tensor, permuted_NH: torch.Tensor, indices_N: torch.Tensor, weights_N: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_permuted_NH, grad_weights_N fp32): g = grad_out[indices]; g * w and rowwise dot(g, permuted)."""
    acc = _opmath_dtype(permuted_NH.dtype)
    g_NH = grad_out_TH.index_select(0, indices_N).to(acc)
    grad_permuted = (g_NH * weights_N.to(acc).unsqueeze(-1)).to(permuted_NH.dtype)
    grad_weights = (g_NH * permuted_NH.to(acc)).sum(-1).to(torch.float32)
    return grad_permuted, grad_weights
