"""Routing maths for the MoE layers, as pure functions (no modules, no process groups).

The router (`router.py`) composes these; each is tested alone (`tests/unit/test_routing*.py`). Functions that
need statistics over the whole sequence take the already reduced quantities as arguments, so the caller decides
which process group to reduce over (the tensor-parallel group under sequence parallelism) and the maths stays
single-process and testable.

Padding masks follow megatron-core's MoE convention: True AT PADDING. `valid_T` below is the inverse (True at real
tokens).

Legend: T tokens (flattened s-major, t = s*B + b, as megatron flattens [S, B, D]), S local sequence length, B batch,
D model dim, E experts, K top-k, G task-table rows, C task embedding dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------- logits


def token_logits(
    x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The classic gate W x (+ b); `dtype` (fp32 by default in the router) keeps bf16 runs' routing stable."""
    dtype = dtype or x_TD.dtype
    bias = None if bias_E is None else bias_E.to(dtype)
    return F.linear(x_TD.to(dtype), weight_ED.to(dtype), bias)


def sentence_masked_sum(x_SBD: torch.Tensor, padding_mask_SB: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sentence sum of the real tokens' representations and their count, over the LOCAL sequence shard.

    Under sequence parallelism each tensor-parallel rank holds S/TP positions of every sentence: the caller
    all-reduces both results over the TP group (with an autograd-aware all-reduce) before `sentence_mean`.
    """
    if x_SBD.dim() != 3:
        raise ValueError(f"sentence_masked_sum expects [S, B, D], got shape {tuple(x_SBD.shape)}")
    if padding_mask_SB is None:
        count_B = torch.full((x_SBD.shape[1],), x_SBD.shape[0], dtype=x_SBD.dtype, device=x_SBD.device)
        return x_SBD.sum(dim=0), count_B
    if padding_mask_SB.shape != x_SBD.shape[:2]:
        raise ValueError(
            f"padding mask shape {tuple(padding_mask_SB.shape)} does not match the tokens' [S, B]={tuple(x_SBD.shape[:2])}"
        )
    valid_SB1 = (~padding_mask_SB.bool()).unsqueeze(-1).to(x_SBD.dtype)
    return (x_SBD * valid_SB1).sum(dim=0), valid_SB1.sum(dim=(0, 2))


def sentence_mean(sum_BD: torch.Tensor, count_B: torch.Tensor) -> torch.Tensor:
    """Masked mean; an all-padding sentence (count 0) gets the zero vector instead of NaN."""
    return sum_BD / count_B.clamp(min=1).unsqueeze(-1)


def expand_per_sequence(values_BX: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Repeat per-sequence rows to every token in megatron's s-major order: [B, ...] -> [seq_len * B, ...]."""
    return values_BX.unsqueeze(0).expand(seq_len, *values_BX.shape).reshape(seq_len * values_BX.shape[0], *values_BX.shape[1:])


def sentence_logits(
    mean_BD: torch.Tensor,
    seq_len: int,
    weight_ED: torch.Tensor,
    bias_E: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Gate applied to each sentence's mean representation, copied to its `seq_len` local tokens: [seq_len*B, E]."""
    return expand_per_sequence(token_logits(mean_BD, weight_ED, bias_E, dtype), seq_len)


def task_logit_table(
    task_emb_GC: torch.Tensor, weight_EC: torch.Tensor, bias_E: torch.Tensor | None = None, dtype=None
) -> torch.Tensor:
    """The learned per-task logit table [G, E]: a task embedding through the gate (a factorized table, so the
    embedding can be shared with the task adapters' gate in the shared-dynamic model)."""
    return token_logits(task_emb_GC, weight_EC, bias_E, dtype)


def task_logits(table_GE: torch.Tensor, task_ids_T: torch.Tensor) -> torch.Tensor:
    """Task-level routing: every token gets its task's row, so all tokens of a task pick the same experts."""
    if task_ids_T.dim() != 1:
        raise ValueError(f"task ids must be 1-D per token, got shape {tuple(task_ids_T.shape)}")
    # Checked here on CPU only: the model's TaskContext checks ids once per micro-batch, and on a GPU a check per
    # layer would synchronise with the host (index_select still asserts on the device).
    if task_ids_T.device.type == "cpu" and task_ids_T.numel() and (
        int(task_ids_T.min()) < 0 or int(task_ids_T.max()) >= table_GE.shape[0]
    ):
        raise ValueError(
            f"task ids range [{int(task_ids_T.min())}, {int(task_ids_T.max())}] outside the task table's "
            f"{table_GE.shape[0]} rows (check MoEConfig.num_tasks / num_languages)"
        )
    return table_GE.index_select(0, task_ids_T)


def task_token_logits(
    x_TD: torch.Tensor,
    task_emb_TC: torch.Tensor,
    weight_EX: torch.Tensor,
    bias_E: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Task-aware token routing: the gate sees concat(token, task embedding), weight [E, D + C]."""
    if weight_EX.shape[1] != x_TD.shape[1] + task_emb_TC.shape[1]:
        raise ValueError(
            f"task-aware gate weight has {weight_EX.shape[1]} inputs, expected D + C = "
            f"{x_TD.shape[1]} + {task_emb_TC.shape[1]}"
        )
    dtype = dtype or x_TD.dtype
    return token_logits(torch.cat([x_TD.to(dtype), task_emb_TC.to(dtype)], dim=-1), weight_EX, bias_E, dtype)


# ------------------------------------------------------------------------------------------ top-k, capacity


def topk_routing(logits_TE: torch.Tensor, topk: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-then-top-k. Returns dense probs [T, E] (zero off the selection) and the boolean routing map.

    renormalize=True rescales the k selected probabilities to sum to 1 (GShard top-2); it equals megatron's
    default (softmax over the k selected logits). Selection is on the logits (softmax is monotonic), which makes
    the chosen experts identical to megatron's `topk_routing_with_score_function`.
    """
    if not 1 <= topk <= logits_TE.shape[-1]:
        raise ValueError(f"topk={topk} must be in [1, {logits_TE.shape[-1]}]")
    top_logits_TK, top_idx_TK = torch.topk(logits_TE, k=topk, dim=-1)
    if renormalize:
        top_probs_TK = torch.softmax(top_logits_TK, dim=-1, dtype=torch.float32)
    else:
        top_probs_TK = torch.softmax(logits_TE, dim=-1, dtype=torch.float32).gather(-1, top_idx_TK)
    top_probs_TK = top_probs_TK.to(logits_TE.dtype)
    probs_TE = torch.zeros_like(logits_TE).scatter(-1, top_idx_TK, top_probs_TK)
    routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(-1, top_idx_TK, True)
    return probs_TE, routing_map_TE


def task_route(table_GE: torch.Tensor, row: int, topk: int, renormalize: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The route every token of task-table row `row` takes under task routing: (experts_K, probs_K), the chosen
    experts in ascending order and each one's weight, exactly the nonzeros of `topk_routing(task_logits(...))`'s row
    for such a token (the same top-k and softmax on the same logits)."""
    if not 0 <= row < table_GE.shape[0]:
        raise ValueError(f"task row {row} outside the task table's {table_GE.shape[0]} rows")
    probs_1E, map_1E = topk_routing(table_GE[row : row + 1], topk, renormalize=renormalize)
    experts_K = map_1E[0].nonzero().squeeze(-1)
    return experts_K, probs_1E[0].index_select(0, experts_K)


def expert_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """Tokens one expert accepts: ceil(num_tokens * topk / num_experts * capacity_factor) (megatron's rule)."""
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


def drop_over_capacity(
    probs_TE: torch.Tensor,
    routing_map_TE: torch.Tensor,
    capacity: int,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
    valid_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most `capacity` tokens per expert, dropping by priority.

    "probs": an expert keeps its highest-probability tokens (megatron's default); "position": its earliest tokens.
    Padding tokens get the lowest priority, so they never push a real token out. pad_to_capacity fills every
    expert to exactly `capacity` slots with zero-probability tokens (fixed shapes), as megatron does.
    """
    if drop_policy not in ("probs", "position"):
        raise ValueError(f"drop_policy={drop_policy!r} must be 'probs' or 'position'")
    num_tokens = probs_TE.shape[0]
    if capacity >= num_tokens:
        keep_TE = torch.ones_like(routing_map_TE) if pad_to_capacity else routing_map_TE
        return probs_TE * keep_TE, keep_TE
    with torch.no_grad():
        # Priority within an expert's column: routed real tokens, then routed padding, then (only for
        # pad_to_capacity) unrouted tokens; within a tier the higher probability ("probs") first, ties (and the
        # "position" policy) broken by the earlier position through a stable sort, so the result is deterministic
        # even when many tokens share one probability (sentence and task routing).
        key_TE = routing_map_TE.to(torch.float64) * 2.0
        if valid_T is not None:
            key_TE = key_TE + valid_T.to(torch.float64).unsqueeze(-1) * routing_map_TE
        if drop_policy == "probs":
            key_TE = key_TE + probs_TE.detach().to(torch.float64).clamp(0, 1) * 0.5
        order_TE = torch.sort(key_TE, dim=0, descending=True, stable=True).indices
        capacity_mask_TE = torch.zeros_like(routing_map_TE).scatter(0, order_TE[:capacity], True)
    keep_TE = capacity_mask_TE if pad_to_capacity else routing_map_TE & capacity_mask_TE
    return probs_TE * keep_TE, keep_TE


# ------------------------------------------------------------------------------------------------- losses


def top1_counts(scores_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose FIRST choice is each expert (GShard's c_e), and the token count; padding excluded. No grad."""
    with torch.no_grad():
        first_TE = F.one_hot(scores_TE.argmax(dim=-1), scores_TE.shape[-1]).to(torch.float32)
        if valid_T is None:
            return first_TE.sum(dim=0), torch.tensor(float(scores_TE.shape[0]), device=scores_TE.device)
        valid_T1 = valid_T.to(torch.float32).unsqueeze(-1)
        return (first_TE * valid_T1).sum(dim=0), valid_T1.sum()


def gshard_load_balancing_loss(
    scores_TE: torch.Tensor,
    counts_E: torch.Tensor,
    num_tokens: torch.Tensor | float,
    valid_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """GShard's auxiliary loss, E * sum_e m_e * c_e / N^2 with m_e the summed softmax probability of expert e and
    c_e its first-choice count (Lepikhin et al. 2020; DeepSpeed's `l_aux`; Pham et al. use it).

    `scores_TE` are softmax probabilities of the LOCAL tokens; `counts_E` and `num_tokens` may be reduced over
    the ranks sharing the sequence (sequence parallelism): the per-rank losses then sum to the global loss, and
    each rank's gradient reaches exactly its own tokens. For top-1 this equals megatron's "aux_loss"; for top-2
    megatron counts both choices, GShard (and this) only the first.
    """
    num_experts = scores_TE.shape[-1]
    if valid_T is not None:
        scores_TE = scores_TE * valid_T.to(scores_TE.dtype).unsqueeze(-1)
    num_tokens = torch.as_tensor(num_tokens, dtype=torch.float32, device=scores_TE.device).clamp(min=1)
    prob_sum_E = scores_TE.float().sum(dim=0)
    return num_experts * (prob_sum_E * counts_E.float()).sum() / (num_tokens * num_tokens)


def gshard_load_balancing_loss_from_logits(logits_TE: torch.Tensor, padding_mask_T: torch.Tensor | None = None):
    """Single-process convenience: the GShard loss of `logits_TE`, padding (True in the mask) excluded."""
    valid_T = None if padding_mask_T is None else ~padding_mask_T.bool()
    scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    counts_E, num_tokens = top1_counts(scores_TE, valid_T)
    return gshard_load_balancing_loss(scores_TE, counts_E, num_tokens, valid_T)


def z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None, num_tokens=None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over real tokens of logsumexp(logits)^2, without the coefficient.

    `num_tokens` defaults to the local real-token count; pass the count reduced over the sequence-parallel ranks
    to make the per-rank losses sum to the global mean.
    """
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    if valid_T is not None:
        z_T = z_T * valid_T.to(z_T.dtype)
        local_count = valid_T.sum()
    else:
        local_count = torch.tensor(logits_TE.shape[0], device=logits_TE.device)
    num_tokens = local_count if num_tokens is None else num_tokens
    num_tokens = torch.as_tensor(num_tokens, dtype=torch.float32, device=logits_TE.device).clamp(min=1)
    return z_T.sum() / num_tokens
