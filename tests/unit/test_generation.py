import itertools

import pytest
import torch

from megatron_taskmoe.generation import SearchConfig, beam_search

BOS, EOS, V = 2, 3, 6


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
    out = beam_search(markov_step_fn(table), batch_size=B, bos=BOS, eos=EOS, max_lengths=[max_len] * B,
                      beam_size=V ** max_len, length_penalty=1.0)
    for b in range(B):
        want = exhaustive_best(table[b], max_len, 1.0)
        assert out[b] == want, (out[b], want)


def test_beam_one_is_greedy():
    g = torch.Generator().manual_seed(7)
    table = torch.log_softmax(torch.randn(1, V, V, generator=g), dim=-1)
    out = beam_search(markov_step_fn(table), batch_size=1, bos=BOS, eos=EOS, max_lengths=[8], beam_size=1)
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
    out = beam_search(markov_step_fn(table), batch_size=1, bos=BOS, eos=EOS, max_lengths=[5], beam_size=2)
    assert out[0] == [4] * 5


def test_search_config_validation_and_lengths():
    with pytest.raises(ValueError, match="beam_size"):
        SearchConfig(beam_size=0)
    assert SearchConfig(max_len_a=1.0, max_len_b=2).max_lengths([3, 10]) == [5, 12]


def test_eos_as_second_choice_does_not_end_greedy_search():
    table = torch.full((1, V, V), -9.0)
    table[0, BOS, 4], table[0, BOS, EOS] = -0.1, -0.5  # eos is second best after bos
    table[0, 4, 5], table[0, 5, EOS] = -0.1, -0.1
    out = beam_search(markov_step_fn(table), batch_size=1, bos=BOS, eos=EOS, max_lengths=[6], beam_size=1)
    assert out[0] == [4, 5]
