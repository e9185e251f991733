"""The vectorised beam search: exact optima on toy models, greedy, length limits, and token-for-token equality
with the former loop search (tests/helpers/search_reference.py) on random toy models."""

import itertools

import pytest
import torch

from megatron_taskmoe.generation import PrefixDecoder, SearchConfig, beam_search
from tests.helpers.search_reference import loop_beam_search, masked

BOS, EOS, V = 2, 3, 6


def search(step_fn, *, batch_size, beam_size=4, **kw):
    return beam_search(PrefixDecoder(step_fn, batch_size=batch_size, beam_size=beam_size), batch_size=batch_size,
                       beam_size=beam_size, bos=BOS, eos=EOS, **kw)


def markov_step_fn(table_BVV):
    """A toy model: next-token log-probs depend on the source sentence and the last token."""

    def step(prefix_NT, src_index_N):
        return table_BVV[src_index_N, prefix_NT[:, -1]]

    return step


def exhaustive_best(table_VV, max_len, length_penalty):
    best = (float("-inf"), None)
    for n in range(0, max_len + 1):
        for body in itertools.product([t for t in range(V) if t != EOS], repeat=n):
            seq = [BOS, *body, EOS]
            score = sum(table_VV[a, b].item() for a, b in zip(seq, seq[1:]))
            norm = score / (n + 1) ** length_penalty
            if norm > best[0]:
                best = (norm, list(body))
    return best[1]


@pytest.mark.parametrize("seed", range(6))
def test_wide_beam_finds_the_exhaustive_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    B, max_len = 2, 4
    table = torch.log_softmax(torch.randn(B, V, V, generator=g) * 2, dim=-1)
    table[:, :, 0] = float("-inf")  # never emit pad
    out = search(markov_step_fn(table), batch_size=B, max_lengths=[max_len] * B, beam_size=V ** max_len,
                 length_penalty=1.0)
    for b in range(B):
        want = exhaustive_best(table[b], max_len, 1.0)
        assert out[b] == want, (out[b], want)


def test_beam_one_is_greedy():
    g = torch.Generator().manual_seed(7)
    table = torch.log_softmax(torch.randn(1, V, V, generator=g), dim=-1)
    out = search(markov_step_fn(table), batch_size=1, max_lengths=[8], beam_size=1)
    seq, last = [], BOS
    for _ in range(8):
        nxt = int(table[0, last].argmax())
        if nxt == EOS:
            break
        seq.append(nxt)
        last = nxt
    assert out[0] == seq


def test_max_length_forces_an_end():
    table = torch.full((1, V, V), -5.0)
    table[0, :, 4] = -0.01  # always prefer token 4, never eos
    out = search(markov_step_fn(table), batch_size=1, max_lengths=[5], beam_size=2)
    assert out[0] == [4] * 5


def test_search_config_validation_and_lengths():
    with pytest.raises(ValueError, match="beam_size"):
        SearchConfig(beam_size=0)
    with pytest.raises(ValueError, match="min_len"):
        SearchConfig(min_len=-1)
    assert SearchConfig(max_len_a=1.0, max_len_b=2).max_lengths([3, 10]) == [5, 12]


def test_eos_as_second_choice_does_not_end_greedy_search():
    table = torch.full((1, V, V), -9.0)
    table[0, BOS, 4], table[0, BOS, EOS] = -0.1, -0.5  # eos is second best after bos
    table[0, 4, 5], table[0, 5, EOS] = -0.1, -0.1
    out = search(markov_step_fn(table), batch_size=1, max_lengths=[6], beam_size=1)
    assert out[0] == [4, 5]


def prefix_step_fn(table_BVV, bias_TV):
    """A toy model whose next-token log-probs depend on the source, the last token and the prefix length."""

    def step(prefix_NT, src_index_N):
        t = prefix_NT.shape[1]
        return torch.log_softmax(table_BVV[src_index_N, prefix_NT[:, -1]] + bias_TV[t], dim=-1)

    return step


@pytest.mark.parametrize("seed", range(12))
def test_vectorised_search_equals_the_loop_search(seed):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 6, (1,), generator=g))
    K = [1, 2, 3, 4, 5, 8][seed % 6]
    vocab = 9
    table = torch.randn(B, vocab, vocab, generator=g) * 2
    bias = torch.randn(20, vocab, generator=g)
    bias[:, EOS] -= float(torch.rand(1, generator=g)) * 3  # some runs end early, others hit the length limit
    max_lengths = torch.randint(0, 12, (B,), generator=g).tolist()
    lp = [0.0, 0.5, 1.0, 2.0][seed % 4]
    step = prefix_step_fn(table, bias)
    want = loop_beam_search(step, batch_size=B, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=K,
                            length_penalty=lp)
    got = search(step, batch_size=B, max_lengths=max_lengths, beam_size=K, length_penalty=lp)
    assert got == want
    # banned tokens and a minimum length: the loop search over the same masked scores
    banned = [0, 1, BOS, 7]  # pad, unk, bos, a tag
    min_len = seed % 4
    want = loop_beam_search(masked(step, banned=banned, eos=EOS, min_length=min_len, max_lengths=max_lengths),
                            batch_size=B, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=K, length_penalty=lp)
    got = search(step, batch_size=B, max_lengths=max_lengths, beam_size=K, length_penalty=lp, min_length=min_len,
                 banned=banned)
    assert got == want
    assert all(not set(h) & set(banned) for h in got)
    assert all(len(h) >= min(min_len, n) for h, n in zip(got, max_lengths))


class CountingDecoder(PrefixDecoder):
    """Counts the rows of every step and checks that reorders keep rows sentence-major."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.rows = []

    def step(self, tokens_N):
        self.rows.append(tokens_N.shape[0])
        return super().step(tokens_N)


def test_finished_sentences_leave_the_batch():
    g = torch.Generator().manual_seed(3)
    table = torch.randn(3, V, V, generator=g)
    bias = torch.zeros(20, V)
    decoder = CountingDecoder(prefix_step_fn(table, bias), batch_size=3, beam_size=2)
    out = beam_search(decoder, batch_size=3, beam_size=2, bos=BOS, eos=EOS, max_lengths=[1, 4, 8])
    assert decoder.rows[0] == 6 and decoder.rows[-1] in (2, 4) and decoder.rows == sorted(decoder.rows, reverse=True)
    assert len(out[0]) <= 1 and len(out[1]) <= 4


def test_eos_cannot_be_banned():
    with pytest.raises(ValueError, match="eos"):
        search(markov_step_fn(torch.zeros(1, V, V)), batch_size=1, max_lengths=[3], banned=[EOS])
