"""Beam search (greedy search is beam 1), vectorised over the batch and the beam, over an incremental decoder.

The model side is an `IncrementalDecoder`: `step(tokens_N)` appends one token to each of the N live hypotheses and
returns the log-probabilities [N, V] of the next one; `reorder(parent_N, sentences)` makes row n continue the former
row `parent_N[n]` (beam reordering), and when `sentences` is given also drops the sentences that are done (the live
set shrinks; `sentences` indexes the formerly live sentences that stay). Rows are sentence-major: the K rows of a
live sentence are consecutive, in the order of the sentences. The megatron model (`model/decoding.py`), its
pipeline stages (`parallel/pipeline_decoding.py`) and the reference model (`reference/model.py`) decode
incrementally with key/value caches; `PrefixDecoder` turns any `step_fn(prefix_NT, src_index_N) -> logprobs_NV`
that scores whole prefixes into a decoder (the full-recompute path, and toy models in the tests).

Search (fairseq's conventions, which the search has always followed): scores are sums of token log-probabilities;
finished hypotheses are ranked by score / length**length_penalty (length counts the eos); per step each sentence
takes the 2K best candidates of its K beams, an eos among the K best finishes a hypothesis, the K best others
continue; a sentence is done once it has K finished hypotheses (or no candidate left). A hypothesis holds at most
its sentence's maximum length of tokens (after that only eos may follow) and at least `min_length` (before that eos
may not follow). `banned` tokens (pad, bos, unk and the `<2xx>` tags: `Tokenizer.banned_ids`) never follow. The
winner is the best-ranked finished hypothesis, the earliest one on a tie.

Everything per step stays on the device: candidates, finished-hypothesis bookkeeping (count, best normalised
score and its tokens per sentence) and the new beams are tensor operations; the one host synchronisation per step
reads which sentences are done (to stop, and to shrink the batch when some finished).

Legend: B batch (source sentences), L live sentences, K beam size, N = L*K hypotheses (rows), t prefix length,
V vocabulary, C = 2K candidates per sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class IncrementalDecoder(Protocol):
    """What `beam_search` drives (see the module docstring)."""

    def step(self, tokens_N: torch.Tensor) -> torch.Tensor:
        """Append `tokens_N` (bos at the first step) to the live rows; log-probabilities [N, V] of the next token."""

    def reorder(self, parent_N: torch.Tensor, sentences_L: Optional[torch.Tensor] = None) -> None:
        """Row n continues former row parent_N[n]; `sentences_L`: the formerly live sentences that stay live."""


@dataclass(kw_only=True)
class SearchConfig:
    """Decoding options (also the `eval.search` section of a run config)."""

    beam_size: int = 1
    """Hypotheses kept per sentence; 1 (the default) is greedy search."""
    length_penalty: float = 1.0
    """Finished hypotheses are ranked by score / length**length_penalty."""
    max_len_a: float = 1.2
    """Maximum target length is max_len_a * source length + max_len_b."""
    max_len_b: int = 10
    """The constant term of the maximum target length (see max_len_a)."""
    min_len: int = 0
    """Minimum number of output tokens before eos (capped by a sentence's maximum length)."""

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_len_a < 0 or self.max_len_b < 1:
            raise ValueError("max_len_a must be >= 0 and max_len_b >= 1")
        if self.min_len < 0:
            raise ValueError(f"min_len must be >= 0, got {self.min_len}")

    def max_lengths(self, src_lengths: Sequence[int], limit: int | None = None) -> list[int]:
        """max_len_a * n + max_len_b per source, capped at `limit` (the model's target positions minus bos)."""
        lengths = [int(self.max_len_a * n + self.max_len_b) for n in src_lengths]
        return lengths if limit is None else [min(n, limit) for n in lengths]


class PrefixDecoder:
    """An `IncrementalDecoder` over a whole-prefix step function (the full-recompute path): it keeps the prefixes
    [N, t] and their source indexes and calls `step_fn(prefix_NT, src_index_N)` on every step."""

    def __init__(self, step_fn: StepFn, *, batch_size: int, beam_size: int, device: torch.device | str = "cpu"):
        self.step_fn = step_fn
        self.prefix_NT = torch.empty((batch_size * beam_size, 0), dtype=torch.long, device=device)
        self.src_index_N = torch.arange(batch_size, device=device).repeat_interleave(beam_size)

    def step(self, tokens_N: torch.Tensor) -> torch.Tensor:
        self.prefix_NT = torch.cat([self.prefix_NT, tokens_N.unsqueeze(1)], dim=1)
        return self.step_fn(self.prefix_NT, self.src_index_N)

    def reorder(self, parent_N: torch.Tensor, sentences_L: Optional[torch.Tensor] = None) -> None:
        self.prefix_NT = self.prefix_NT.index_select(0, parent_N)
        self.src_index_N = self.src_index_N.index_select(0, parent_N)


def _first_k(mask_LC: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [L, k] of the first k True entries of each row (in order; padded with other positions) and
    whether each is one of them [L, k]."""
    C = mask_LC.shape[1]
    rank_C = torch.arange(C, device=mask_LC.device)
    key_LC = torch.where(mask_LC, rank_C, rank_C + C)
    pos_LK = key_LC.topk(k, dim=1, largest=False, sorted=True).indices
    return pos_LK, mask_LC.gather(1, pos_LK)


@torch.no_grad()
def beam_search(decoder: IncrementalDecoder, *, batch_size: int, bos: int, eos: int, max_lengths: Sequence[int],
                beam_size: int = 4, length_penalty: float = 1.0, min_length: int = 0,
                banned: Sequence[int] = (), device: torch.device | str = "cpu") -> list[list[int]]:
    """Best hypothesis per source sentence, as token ids without bos/eos (see the module docstring).

    `decoder` holds `batch_size * beam_size` rows at the start (beam k of sentence b is row b*K + k)."""
    if len(max_lengths) != batch_size:
        raise ValueError("max_lengths needs one entry per source sentence")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if eos in banned:
        raise ValueError(f"the eos id {eos} cannot be banned")
    B, K = batch_size, beam_size
    dev = torch.device(device)
    max_len = max(max_lengths, default=0)
    neg_inf = float("-inf")
    max_len_B = torch.tensor(list(max_lengths), dtype=torch.long, device=dev)
    min_len_B = torch.clamp(max_len_B, max=min_length)
    banned_index = torch.tensor(sorted(set(banned)), dtype=torch.long, device=dev)

    # Finished hypotheses per sentence: how many, the best normalised score and its tokens.
    fin_count_B = torch.zeros(B, dtype=torch.long, device=dev)
    best_score_B = torch.full((B,), neg_inf, dtype=torch.float64, device=dev)
    best_len_B = torch.zeros(B, dtype=torch.long, device=dev)
    best_tokens_BT = torch.zeros((B, max_len + 1), dtype=torch.long, device=dev)

    # Live state: sentence ids [L], beam scores [L, K], output tokens so far [N, t-1] (bos excluded).
    live_L = torch.arange(B, device=dev)
    scores_LK = torch.full((B, K), neg_inf, device=dev)
    scores_LK[:, 0] = 0.0  # at the first step only beam 0 of each sentence is live
    tokens_NT = torch.zeros((B * K, 0), dtype=torch.long, device=dev)
    next_N = torch.full((B * K,), bos, dtype=torch.long, device=dev)
    beam_offset_K = torch.arange(K, device=dev)

    for t in range(1, max_len + 2):
        L = live_L.shape[0]
        logp_NV = decoder.step(next_N).float()
        V = logp_NV.shape[-1]
        logp_LKV = logp_NV.view(L, K, V)
        if banned_index.numel():
            logp_LKV = logp_LKV.index_fill(2, banned_index, neg_inf)
        # A prefix of max length tokens may only end; a prefix shorter than the minimum may not.
        at_limit_L11 = (t > max_len_B.index_select(0, live_L)).view(L, 1, 1)
        eos_logp_LK1 = logp_LKV[:, :, eos : eos + 1]
        too_short_L11 = (t <= min_len_B.index_select(0, live_L)).view(L, 1, 1)
        eos_logp_LK1 = eos_logp_LK1.masked_fill(too_short_L11, neg_inf)
        logp_LKV = logp_LKV.masked_fill(at_limit_L11, neg_inf)
        logp_LKV[:, :, eos : eos + 1] = eos_logp_LK1

        cand_LKV = scores_LK.unsqueeze(-1) + logp_LKV
        C = min(2 * K, K * V)
        top_score_LC, top_flat_LC = cand_LKV.view(L, K * V).topk(C, dim=-1)
        top_beam_LC = torch.div(top_flat_LC, V, rounding_mode="floor")
        top_token_LC = top_flat_LC - top_beam_LC * V
        finite_LC = top_score_LC > neg_inf
        is_eos_LC = top_token_LC == eos

        # Finishing: an eos among the K best candidates, while the sentence has fewer than K finished.
        rank_C = torch.arange(C, device=dev)
        eos_ok_LC = is_eos_LC & finite_LC & (rank_C < K)
        before_LC = torch.cumsum(eos_ok_LC.long(), dim=1) - eos_ok_LC.long()
        fin_count_L = fin_count_B.index_select(0, live_L)
        accept_LC = eos_ok_LC & (fin_count_L.unsqueeze(1) + before_LC < K)
        # All of this step's hypotheses have length t: the best of them is the first accepted one.
        first_pos_L1, any_accept_L1 = _first_k(accept_LC, 1)
        first_score_L = top_score_LC.gather(1, first_pos_L1).squeeze(1).double() / (float(t) ** length_penalty)
        old_best_L = best_score_B.index_select(0, live_L)
        improve_L = any_accept_L1.squeeze(1) & (first_score_L > old_best_L)
        if t > 1:
            src_row_L = torch.arange(L, device=dev) * K + top_beam_LC.gather(1, first_pos_L1).squeeze(1)
            cand_tokens_LT = tokens_NT.index_select(0, src_row_L)
            width = cand_tokens_LT.shape[1]
            old_tokens_LT = best_tokens_BT.index_select(0, live_L)[:, :width]
            best_tokens_BT[:, :width].index_copy_(
                0, live_L, torch.where(improve_L.unsqueeze(1), cand_tokens_LT, old_tokens_LT))
        best_score_B.index_copy_(0, live_L, torch.where(improve_L, first_score_L, old_best_L))
        best_len_B.index_copy_(0, live_L, torch.where(improve_L, t - 1, best_len_B.index_select(0, live_L)))
        fin_count_L = fin_count_L + accept_LC.sum(dim=1)
        fin_count_B.index_copy_(0, live_L, fin_count_L)

        # Continuing: the K best other candidates, in rank order; missing ones become dead beams (-inf).
        cont_pos_LK, cont_ok_LK = _first_k(~is_eos_LC & finite_LC, K)
        new_scores_LK = top_score_LC.gather(1, cont_pos_LK).masked_fill(~cont_ok_LK, neg_inf)
        parent_LK = top_beam_LC.gather(1, cont_pos_LK) + (torch.arange(L, device=dev) * K).unsqueeze(1)
        new_tokens_LK = top_token_LC.gather(1, cont_pos_LK).masked_fill(~cont_ok_LK, eos)
        done_L = ~cont_ok_LK[:, 0] | (fin_count_L >= K)

        done = done_L.tolist()  # the one host synchronisation of the step
        if all(done):
            break
        parent_N, next_N, scores_LK = parent_LK.view(-1), new_tokens_LK.view(-1), new_scores_LK
        sentences_L = None
        if any(done):
            keep = [i for i, d in enumerate(done) if not d]
            sentences_L = torch.tensor(keep, dtype=torch.long, device=dev)
            rows_N = (sentences_L.unsqueeze(1) * K + beam_offset_K).view(-1)
            parent_N, next_N = parent_N.index_select(0, rows_N), next_N.index_select(0, rows_N)
            scores_LK, live_L = scores_LK.index_select(0, sentences_L), live_L.index_select(0, sentences_L)
        tokens_NT = torch.cat([tokens_NT.index_select(0, parent_N), next_N.unsqueeze(1)], dim=1)
        if K > 1 or sentences_L is not None:  # a single beam only moves when sentences leave
            decoder.reorder(parent_N, sentences_L)

    lengths = best_len_B.tolist()
    rows = best_tokens_BT.tolist()
    # A sentence without a finished hypothesis (only when its maximum length is 0 and eos is impossible) is empty.
    return [row[:n] for row, n in zip(rows, lengths)]
