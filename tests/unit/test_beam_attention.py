"""ops.beam_attention (kernels and pure-torch paths) against attention over an explicitly reordered cache (self-
attention) or over each sentence's real source positions (cross-attention), and the decoder cache that uses them
(beam reorders and finished sentences), errors included. The kernels have a vector path (head dims 64 and 128, query
rows in groups of 4 and one by one) and a scalar path (other head dims, groups of 2 or 3): the shapes cover both.

Legend: B cache slots, L live sentences, K beam, N = L*K rows, H query heads, Hkv key/value heads, Q query
positions, T capacity, t attended positions, D head dim.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_taskmoe.model.kv_cache import DecoderCache
from megatron_taskmoe.ops.beam_attention import (
    beam_cross_attention,
    beam_decode_attention,
    gather_history,
    kernel_available,
    resolved_backend,
)

BACKENDS = ["extension", "torch"]
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module", autouse=True)
def _require_kernel():
    # The operator is part of the extension build (setup.py): its absence is a build failure, not a reason to skip.
    assert kernel_available(), (
        "torch.ops.taskmoe.beam_decode_attention is not built: pip install --no-build-isolation -e ."
    )


def naive(query_NHQD, key_cache, value_cache, slots_L, ancestry_NT, length, scale):
    """Row by row, position by position, in float64: softmax(q k^T * scale) v over each row's own history."""
    N, H, Q, D = query_NHQD.shape
    _, Hkv, _, K, _ = key_cache.shape
    out = torch.zeros(N, H, Q, D, dtype=torch.float64)
    for n in range(N):
        slot = int(slots_L[n // K])
        beams = [int(b) for b in ancestry_NT[n, :length]]
        for h in range(H):
            hk = h // (H // Hkv)
            keys = torch.stack([key_cache[slot, hk, p, b] for p, b in enumerate(beams)]).double()
            values = torch.stack([value_cache[slot, hk, p, b] for p, b in enumerate(beams)]).double()
            weights = torch.softmax(query_NHQD[n, h].double() @ keys.T * scale, dim=-1)
            out[n, h] = weights @ values
    return out


def random_case(*, B=5, L=3, K=3, H=4, Hkv=2, Q=1, T=7, D=24, length=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    key_cache = torch.randn(B, Hkv, T, K, D, generator=g).to(dtype)
    value_cache = torch.randn(B, Hkv, T, K, D, generator=g).to(dtype)
    slots_L = torch.randperm(B, generator=g)[:L]
    ancestry_NT = torch.randint(0, K, (L * K, T), generator=g)
    query_NHQD = torch.randn(L * K, H, Q, D, generator=g).to(dtype)
    return query_NHQD, key_cache, value_cache, slots_L, ancestry_NT, length, 1.0 / math.sqrt(D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(), dict(H=4, Hkv=4, Q=2), dict(K=1, L=2, H=2, Hkv=1, length=7, D=8),
                                   dict(length=1, D=64), dict(K=5, L=2, H=2, Hkv=1, T=40, length=37, D=64),
                                   dict(K=4, L=2, H=2, Hkv=2, Q=2, T=20, length=19, D=128),
                                   dict(K=2, L=2, T=20, length=18, D=32)])
def test_matches_attention_over_each_rows_own_history(backend, dtype, shape):
    case = random_case(dtype=dtype, **shape)
    got = beam_decode_attention(*case, backend=backend)
    want = naive(*case)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.double() - want).abs().max() <= TOL[dtype], (got.double() - want).abs().max()


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_kernel_and_torch_path_agree_and_kernel_is_thread_count_independent(kind):
    if kind == "self":
        op, case = beam_decode_attention, random_case(B=6, L=6, K=4, H=8, Hkv=8, T=40, D=64, length=33, seed=3)
    else:
        op, case = beam_cross_attention, random_cross_case(L=8, H=8, Hkv=8, X=4, S=45, D=64, seed=4)
    kernel = op(*case, backend="extension")
    torch.testing.assert_close(kernel, op(*case, backend="torch"), atol=2e-6, rtol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = op(*case, backend="extension")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, kernel)


def test_scores_far_apart_keep_their_weights():
    """A large scale spreads the scores over hundreds of units: the kernel's exp (a polynomial, clamped below -87)
    still matches float64 softmax."""
    case = list(random_case(B=2, L=2, K=4, H=2, Hkv=2, T=30, D=64, length=30, seed=5))
    case[6] = 40.0
    got = beam_decode_attention(*case, backend="extension")
    assert (got.double() - naive(*case)).abs().max() <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_score_of_minus_infinity_gets_no_weight(backend):
    """A key whose score with every query is -inf (here: -inf entries against a positive query) weighs nothing,
    as in float64 softmax, instead of turning the row into NaN."""
    query, key_cache, value_cache, slots_L, ancestry_NT, length, scale = random_case(B=2, L=2, K=4, H=2, Hkv=2,
                                                                                      T=20, D=64, length=20, seed=6)
    query = query.abs() + 0.1
    key_cache[:, :, 3] = float("-inf")  # position 3 of every beam slot
    case = (query, key_cache, value_cache, slots_L, ancestry_NT, length, scale)
    got = beam_decode_attention(*case, backend=backend)
    assert torch.isfinite(got).all()
    assert (got.double() - naive(*case)).abs().max() <= 2e-6


def naive_cross(query_LHXD, key_LHSD, value_LHSD, allowed_LS, scale):
    """Row by row in float64: softmax(q k^T * scale) v over the sentence's allowed source positions."""
    L, H, X, D = query_LHXD.shape
    Hkv = key_LHSD.shape[1]
    out = torch.zeros(L, H, X, D, dtype=torch.float64)
    for l in range(L):
        positions = allowed_LS[l].nonzero().squeeze(1)
        for h in range(H):
            keys = key_LHSD[l, h // (H // Hkv), positions].double()
            values = value_LHSD[l, h // (H // Hkv), positions].double()
            out[l, h] = torch.softmax(query_LHXD[l, h].double() @ keys.T * scale, dim=-1) @ values
    return out


def random_cross_case(*, L=3, H=4, Hkv=2, X=4, S=9, D=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(L, H, X, D, generator=g).to(dtype)
    key, value = (torch.randn(L, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
    allowed = torch.rand(L, S, generator=g) < 0.6
    allowed[:, 0] = True  # every sentence sees something
    allowed[-1] = True  # and one sees everything
    return query, key, value, allowed, 1.0 / math.sqrt(D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(), dict(H=2, Hkv=2, X=5, S=37, D=64), dict(L=2, H=2, Hkv=1, X=4, S=20, D=128),
                                   dict(X=3, S=1, D=64)])
def test_cross_attention_matches_attention_over_the_allowed_positions(backend, dtype, shape):
    case = random_cross_case(dtype=dtype, **shape)
    got = beam_cross_attention(*case, backend=backend)
    want = naive_cross(*case)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.double() - want).abs().max() <= TOL[dtype], (got.double() - want).abs().max()


def test_cross_attention_bad_inputs_raise_clear_errors():
    query, key, value, allowed, scale = random_cross_case()
    none_allowed = allowed.clone()
    none_allowed[1] = False
    with pytest.raises(RuntimeError, match="sentence 1 allows no source position"):
        beam_cross_attention(query, key, value, none_allowed, scale, backend="extension")
    with pytest.raises(RuntimeError, match="allowed must be a bool"):
        beam_cross_attention(query, key, value, allowed.long(), scale, backend="extension")
    with pytest.raises(RuntimeError, match="must share a dtype"):
        beam_cross_attention(query, key.half(), value, allowed, scale, backend="extension")
    with pytest.raises(RuntimeError, match="do not fit query"):
        beam_cross_attention(query, key[:2], value[:2], allowed, scale, backend="extension")


def test_gather_history_is_what_a_reordered_cache_holds():
    _, key_cache, _, slots_L, ancestry_NT, length, _ = random_case()
    got = gather_history(key_cache, slots_L, ancestry_NT[:, :length])
    K = key_cache.shape[3]
    for n in range(got.shape[0]):
        for p in range(length):
            assert torch.equal(got[n, :, p], key_cache[slots_L[n // K], :, p, ancestry_NT[n, p]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_cache_equals_a_reordered_cache_through_reorders_and_finished_sentences(backend):
    """Steps, beam reorders and sentences leaving, against the former layout: per-row keys/values copied to the
    new rows at every reorder, attended with scaled_dot_product_attention."""
    g = torch.Generator().manual_seed(7)
    B, K, H, Hkv, D, steps = 4, 3, 4, 2, 16, 9
    cache = DecoderCache(beam_size=K, max_length=steps, src_padding_mask_BS=torch.zeros(B, 5, dtype=torch.bool),
                         attention_backend=backend)
    keys_NHtD = torch.empty(B * K, Hkv, 0, D)
    values_NHtD = torch.empty(B * K, Hkv, 0, D)
    live = list(range(B))
    for step in range(steps):
        N = len(live) * K
        query = torch.randn(N, H, 1, D, generator=g)
        key, value = torch.randn(N, Hkv, 1, D, generator=g), torch.randn(N, Hkv, 1, D, generator=g)
        got = cache.attend_self(0, query, key, value, scale=0.3)
        cache.advance()
        keys_NHtD, values_NHtD = torch.cat([keys_NHtD, key], 2), torch.cat([values_NHtD, value], 2)
        want = F.scaled_dot_product_attention(query, keys_NHtD.repeat_interleave(H // Hkv, 1),
                                              values_NHtD.repeat_interleave(H // Hkv, 1), scale=0.3)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
        # Each row continues a random row of its sentence; sentence 1 leaves after step 2, sentence 3 after 5.
        leaving = {2: 1, 5: 3}.get(step)
        keep = [i for i, s in enumerate(live) if s != leaving]
        parent_N = torch.tensor([i * K + int(torch.randint(0, K, (), generator=g)) for i in keep for _ in range(K)])
        cache.reorder(parent_N, None if leaving is None else torch.tensor(keep))
        keys_NHtD, values_NHtD = keys_NHtD.index_select(0, parent_N), values_NHtD.index_select(0, parent_N)
        live = [live[i] for i in keep]
    assert cache.sources_L.tolist() == [0, 2]


def test_bad_inputs_raise_clear_errors():
    case = list(random_case())
    with pytest.raises(ValueError, match="backend must be one of"):
        beam_decode_attention(*case, backend="cuda")
    with pytest.raises(RuntimeError, match="no kernel for cpu tensors of torch.float64"):
        resolved_backend("extension", case[0].double())
    assert resolved_backend("auto", case[0].double()) == "torch"
    bad_ancestry = case[4].clone()
    bad_ancestry[2, 1] = 3  # K = 3
    with pytest.raises(RuntimeError, match=r"ancestry\[2, 1\] = 3 outside \[0, 3\)"):
        beam_decode_attention(*case[:4], bad_ancestry, *case[5:], backend="extension")
    with pytest.raises(RuntimeError, match=r"slots\[0\] = 9 outside \[0, 5\)"):
        beam_decode_attention(*case[:3], torch.tensor([9, 0, 1]), *case[4:], backend="extension")
    with pytest.raises(RuntimeError, match="must share a dtype"):
        beam_decode_attention(case[0].half(), *case[1:], backend="extension")
    with pytest.raises(RuntimeError, match="length 8 outside"):
        beam_decode_attention(*case[:5], 8, case[6], backend="extension")
    mask_BS = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        DecoderCache(beam_size=2, max_length=3, src_padding_mask_BS=mask_BS, attention_backend="triton")
    cache = DecoderCache(beam_size=2, max_length=3, src_padding_mask_BS=mask_BS)
    with pytest.raises(ValueError, match="every row must continue a row of its own sentence"):
        cache.reorder(torch.tensor([0, 2, 2, 3]))
