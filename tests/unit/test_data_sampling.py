"""Temperature sampling, data-parallel sharding and exact resume of the sampler and the token batcher."""

import numpy as np
import pytest

from megatron_taskmoe.data.batching import BatchingConfig, TokenBatchSampler, pack_window
from megatron_taskmoe.data.sampler import TemperatureSampler
from megatron_taskmoe.data.tokenizer import temperature_probabilities

SIZES = [5000, 800, 60, 7]


def test_temperature_probabilities_limits():
    p1 = temperature_probabilities(SIZES, 1.0)
    np.testing.assert_allclose(p1, np.array(SIZES) / sum(SIZES))
    p5 = temperature_probabilities(SIZES, 5.0)
    expected = np.array(SIZES, dtype=float) ** 0.2
    np.testing.assert_allclose(p5, expected / expected.sum())
    assert np.abs(temperature_probabilities(SIZES, 1e6) - 0.25).max() < 1e-4
    assert temperature_probabilities([10, 0, 5], 2.0)[1] == 0.0
    with pytest.raises(ValueError):
        temperature_probabilities(SIZES, 0.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, 100.0])
def test_empirical_proportions_match(temperature):
    sampler = TemperatureSampler(SIZES, temperature, seed=3, block_size=4096)
    draws = 200_000
    flat = sampler.global_indices(0, draws)
    offsets = np.concatenate([[0], np.cumsum(SIZES)])
    direction = np.searchsorted(offsets, flat, side="right") - 1
    empirical = np.bincount(direction, minlength=len(SIZES)) / draws
    p = temperature_probabilities(SIZES, temperature)
    sigma = np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(empirical - p) <= 5 * sigma + 1e-12), (empirical, p)


def test_each_epoch_of_a_direction_is_a_permutation():
    sampler = TemperatureSampler(SIZES, 1.0, seed=0, block_size=1000)
    flat = sampler.global_indices(0, 30_000)
    in_d1 = flat[(flat >= 5000) & (flat < 5800)] - 5000
    assert len(in_d1) >= 1600
    assert sorted(in_d1[:800]) == list(range(800))
    assert sorted(in_d1[800:1600]) == list(range(800))
    assert not np.array_equal(in_d1[:800], in_d1[800:1600])  # a new order each epoch


@pytest.mark.parametrize("seed", [0, 1, 17, 12345])
def test_sharding_and_resume(seed):
    stream = TemperatureSampler(SIZES, 5.0, seed=seed, block_size=500).global_indices(0, 6000)
    dp = 3
    per_rank = []
    for rank in range(dp):
        it = iter(TemperatureSampler(SIZES, 5.0, seed=seed, dp_rank=rank, dp_size=dp, block_size=500))
        per_rank.append([next(it) for _ in range(2000)])
    np.testing.assert_array_equal(np.array(per_rank).T.reshape(-1), stream)  # disjoint, union = stream
    consumed = 3 * 777
    for rank in range(dp):
        it = iter(TemperatureSampler(SIZES, 5.0, seed=seed, consumed_samples=consumed, dp_rank=rank, dp_size=dp,
                                     block_size=500))
        assert [next(it) for _ in range(300)] == per_rank[rank][777:1077]
    other = TemperatureSampler(SIZES, 5.0, seed=seed + 1, block_size=500).global_indices(0, 6000)
    assert not np.array_equal(other, stream)


def _lengths(seed):
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    return rng.integers(3, 60, n), rng.integers(2, 60, n), np.repeat(np.arange(len(SIZES)), SIZES)


@pytest.mark.parametrize("seed", [0, 5, 99])
@pytest.mark.parametrize("homogeneous", [False, True])
def test_token_batcher_budget_sharding_resume(seed, homogeneous):
    src, tgt, task = _lengths(seed)
    cfg = BatchingConfig(max_tokens=600, window_samples=1000, task_homogeneous=homogeneous, pad_to_multiple=8)
    dp, steps = 2, 80
    runs = []
    for rank in range(dp):
        sampler = TemperatureSampler(SIZES, 5.0, seed=seed, block_size=700)
        it = iter(TokenBatchSampler(sampler, src, tgt, task, cfg, dp_rank=rank, dp_size=dp))
        runs.append([next(it) for _ in range(steps)])
    stream = TemperatureSampler(SIZES, 5.0, seed=seed, block_size=700).global_indices(0, 20_000)
    for step in range(steps):
        (b0, c0), (b1, c1) = runs[0][step], runs[1][step]
        assert c0 == c1  # every rank computes the same consumed counter
        for b in (b0, b1):
            longest = max(max(-(-src[i] // 8) * 8, -(-tgt[i] // 8) * 8) for i in b)
            assert len(b) * longest <= 600 or len(b) == 1
            if homogeneous:
                assert len({int(task[i]) for i in b}) == 1
    # at a window boundary, the batches of all ranks are exactly the stream prefix (as a multiset)
    boundary = next(s for s in range(steps) if runs[0][s][1] == 1000)
    seen = sorted(i for r in runs for b, _ in r[: boundary + 1] for i in b)
    assert seen == sorted(stream[:1000].tolist())
    # resume from any step's counter reproduces the rest exactly
    for cut in (0, 3, boundary, boundary + 1, steps - 5):
        consumed = runs[0][cut][1]
        for rank in range(dp):
            sampler = TemperatureSampler(SIZES, 5.0, seed=seed, block_size=700)
            it = iter(TokenBatchSampler(sampler, src, tgt, task, cfg, dp_rank=rank, dp_size=dp,
                                        consumed_samples=consumed))
            assert [next(it) for _ in range(steps - cut - 1)] == runs[rank][cut + 1:]


def test_resume_rejects_a_counter_off_the_boundaries():
    src, tgt, task = _lengths(0)
    cfg = BatchingConfig(max_tokens=600, window_samples=1000)
    sampler = TemperatureSampler(SIZES, 5.0, seed=0)
    first = next(iter(TokenBatchSampler(sampler, src, tgt, task, cfg)))
    with pytest.raises(ValueError, match="micro-step boundary"):
        TokenBatchSampler(sampler, src, tgt, task, cfg, consumed_samples=first[1] - 1)


def test_fixed_batch_size_and_rank_multiple():
    src, tgt, task = np.full(103, 5), np.full(103, 5), np.zeros(103, dtype=int)
    cfg = BatchingConfig(batch_size=10, window_samples=103)
    batches = pack_window(src, tgt, task, cfg, dp_size=4, window=0, seed=1234)
    assert len(batches) % 4 == 0
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    assert max(len(b) for b in batches) <= 10
    with pytest.raises(ValueError):
        BatchingConfig(max_tokens=100, batch_size=4)
