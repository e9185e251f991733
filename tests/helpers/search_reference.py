"""The former beam search, a Python loop over hypotheses with whole prefixes: the tests' reference for the
vectorised `generation.beam_search` (token for token) and, with a full-recompute step function, for incremental
decoding. Unchanged except that the step function's output goes through `masked` first when the new search is
given banned tokens or a minimum length (which the former search did not have).

Legend: B batch (source sentences), K beam size, N = B*K hypotheses, t prefix length, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def masked(step_fn: StepFn, *, banned: Sequence[int] = (), eos: int | None = None, min_length: int = 0,
           max_lengths: Sequence[int] = ()) -> StepFn:
    """`step_fn` with banned tokens at -inf and eos at -inf while a prefix is shorter than min(min_length, its
    sentence's max length) tokens (the prefix holds bos + tokens)."""

    def step(prefix_NT: torch.Tensor, src_index_N: torch.Tensor) -> torch.Tensor:
        logp_NV = step_fn(prefix_NT, src_index_N).float().clone()
        if banned:
            logp_NV[:, list(banned)] = float("-inf")
        if min_length:
            t = prefix_NT.shape[1]
            limit_N = torch.tensor([min(min_length, max_lengths[int(b)]) for b in src_index_N])
            logp_NV[t <= limit_N, eos] = float("-inf")
        return logp_NV

    return step


@torch.no_grad()
def loop_beam_search(step_fn: StepFn, *, batch_size: int, bos: int, eos: int, max_lengths: Sequence[int],
                     beam_size: int = 4, length_penalty: float = 1.0, device: torch.device | str = "cpu"
                     ) -> list[list[int]]:
    """Best hypothesis per source sentence, as token ids without bos/eos."""
    if len(max_lengths) != batch_size:
        raise ValueError("max_lengths needs one entry per source sentence")
    B, K = batch_size, beam_size
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    # Active hypotheses, stored densely as [B*K, t]; at step 0 only beam 0 of each sentence is live.
    prefix_NT = torch.full((B * K, 1), bos, dtype=torch.long, device=device)
    scores_BK = torch.full((B, K), float("-inf"), device=device)
    scores_BK[:, 0] = 0.0
    src_index_N = torch.arange(B, device=device).repeat_interleave(K)
    max_len = max(max_lengths)

    for t in range(1, max_len + 2):
        live = [b for b in range(B) if not done[b]]
        if not live:
            break
        rows = torch.tensor([b * K + k for b in live for k in range(K)], device=device)
        logp_NV = step_fn(prefix_NT[rows], src_index_N[rows]).float()
        V = logp_NV.shape[-1]
        at_limit = [i for i, b in enumerate(live) if t > max_lengths[b]]
        if at_limit:  # a prefix of max length tokens may only end
            limit_rows = torch.tensor([i * K + k for i in at_limit for k in range(K)], device=device)
            eos_logp = logp_NV[limit_rows, eos].clone()
            logp_NV[limit_rows] = float("-inf")
            logp_NV[limit_rows, eos] = eos_logp
        cand_LKV = scores_BK[live].unsqueeze(-1) + logp_NV.view(len(live), K, V)
        top_scores, top_idx = cand_LKV.view(len(live), K * V).topk(min(2 * K, K * V), dim=-1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        new_prefix = prefix_NT.new_full((B * K, t + 1), eos)
        new_scores = torch.full((B, K), float("-inf"), device=device)
        for i, b in enumerate(live):
            kept = 0
            for rank, (score, flat) in enumerate(zip(top_scores[i], top_idx[i])):
                if score == float("-inf"):
                    break
                k, tok = divmod(flat, V)
                src_row = b * K + k
                if tok == eos:
                    # As fairseq: only an eos among the K best candidates ends a hypothesis (beam 1 is greedy).
                    if rank < K and len(finished[b]) < K:
                        hyp = prefix_NT[src_row, 1:].tolist()
                        finished[b].append((score / (len(hyp) + 1) ** length_penalty, hyp))
                    continue
                if kept < K:
                    new_prefix[b * K + kept, :t] = prefix_NT[src_row]
                    new_prefix[b * K + kept, t] = tok
                    new_scores[b, kept] = score
                    kept += 1
            if kept == 0 or len(finished[b]) >= K:
                done[b] = True
        prefix_NT, scores_BK = new_prefix, new_scores

    out = []
    for b in range(B):
        if not finished[b]:  # max length 0 edge: nothing generated
            out.append([])
            continue
        out.append(max(finished[b], key=lambda x: x[0])[1])
    return out
