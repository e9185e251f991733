"""Batched beam search (and greedy search as beam 1) over any encoder-decoder that can score a prefix.

The model side is a `step_fn(prefix_NT, src_index_N) -> logprobs_NV`: given N hypotheses' target prefixes (bos first)
and, for each, the index of its source sentence in the batch, return log-probabilities of the next token. The model
keeps its encoder output for the B sources and gathers it with `src_index_N`, so hypotheses can be reordered freely.

Legend: B batch (source sentences), K beam size, N = B*K hypotheses, t prefix length, V vocabulary.

Scores are sums of token log-probabilities; finished hypotheses are ranked by score / length**length_penalty
(fairseq's convention; length counts the eos). As in fairseq, a sentence is done once it has K finished hypotheses.
A hypothesis holds at most its sentence's maximum length of tokens; after that only eos may follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(kw_only=True)
class SearchConfig:
    """Decoding options."""

    beam_size: int = 4
    """1 means greedy search."""
    length_penalty: float = 1.0
    """Finished hypotheses are ranked by score / length**length_penalty."""
    max_len_a: float = 1.2
    """Maximum target length is max_len_a * source length + max_len_b."""
    max_len_b: int = 10

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_len_a < 0 or self.max_len_b < 1:
            raise ValueError("max_len_a must be >= 0 and max_len_b >= 1")

    def max_lengths(self, src_lengths: Sequence[int], limit: int | None = None) -> list[int]:
        """max_len_a * n + max_len_b per source, capped at `limit` (the model's target positions minus bos)."""
        lengths = [int(self.max_len_a * n + self.max_len_b) for n in src_lengths]
        return lengths if limit is None else [min(n, limit) for n in lengths]


@torch.no_grad()
def beam_search(step_fn: StepFn, *, batch_size: int, bos: int, eos: int, max_lengths: Sequence[int],
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
