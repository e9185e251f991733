"""The CPU kernels at sizes that use their output cache (>= 4 MiB outputs), and the cache itself.

The other permutation tests use small tensors, whose outputs come from torch's allocator; here the outputs are
recycled huge-page blocks, so these tests check that such blocks give bitwise the fallback's results (a recycled
block holds stale data: every byte must be written), behave as ordinary tensors (resize, clone, save), survive
empty_output_cache while alive, and that the limit (set_output_cache_limit) holds; TASKMOE_OPS_CACHE_MB is
checked in a fresh process by tests/integration/test_permute_output_cache_env.py.

Legend: T tokens, H hidden size, E experts, K experts per token, N permuted rows.
"""

import io

import pytest
import torch

from megatron.core.transformer.moe import moe_utils

from megatron_taskmoe import ops
from megatron_taskmoe.compat.moe import mcore_permute
from megatron_taskmoe.ops import fallback
from tests.helpers.permute_reference import check_against_megatron, topk_routing

ext = torch.ops.taskmoe
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _require_extension():
    assert ops.extension_available(), "megatron_taskmoe.ops._permute_ext is not built"


@pytest.fixture
def cache_limit():
    """Restores the cache limit after a test that changes it."""
    before = ops.output_cache_stats()["limit_bytes"]
    yield
    ops.set_output_cache_limit(before)


def misses():
    return ops.output_cache_stats()["misses"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("topk", [1, 2])
def test_large_outputs_equal_fallback_bitwise(dtype, topk, cache_limit):
    num_tokens, hidden, num_experts = 2048, 1024, 16  # N*H*elem >= 4 MiB for every dtype: cached blocks
    routing_map_TE, probs_TE = topk_routing(num_tokens, num_experts, topk, seed=topk)
    gen = torch.Generator().manual_seed(5)
    tokens_TH = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    # Poison the cache: recycled blocks full of NaN must not leak into any output.
    ops.set_output_cache_limit(max(ops.output_cache_stats()["limit_bytes"], 256 * MIB))
    for _ in range(2):
        ext.gather_rows(torch.full((num_tokens * topk, hidden), float("nan"), dtype=dtype),
                        torch.arange(num_tokens * topk), None)
    before = misses()

    idx_N, slot_expert_N = ext.permute_index(routing_map_TE, -1)
    ref_idx_N, ref_slot_N = fallback.permute_index(routing_map_TE, -1)
    assert torch.equal(idx_N, ref_idx_N) and torch.equal(slot_expert_N, ref_slot_N)
    w_N = probs_TE[idx_N, slot_expert_N]
    row_ptr, slots = ext.inverse_index(idx_N, num_tokens)
    y_NH = ext.gather_rows(tokens_TH, idx_N, None)
    pairs = [
        (y_NH, fallback.gather_rows(tokens_TH, idx_N, None)),
        (ext.gather_rows(tokens_TH, idx_N, w_N), fallback.gather_rows(tokens_TH, idx_N, w_N)),
        (ext.gather_sum(y_NH, row_ptr, slots, None, num_tokens),
         fallback.gather_sum(y_NH, row_ptr, slots, None, num_tokens)),
        (ext.gather_sum(y_NH, row_ptr, slots, w_N, num_tokens),
         fallback.gather_sum(y_NH, row_ptr, slots, w_N, num_tokens)),
    ]
    grad_TH = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    gx, gw = ext.unpermute_backward(grad_TH, y_NH, idx_N, w_N)
    ref_gx, ref_gw = fallback.unpermute_backward(grad_TH, y_NH, idx_N, w_N)
    pairs.append((gx, ref_gx))
    for ours, ref in pairs:
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert torch.equal(ours, ref)
    # The row dot sums in fixed lanes, the fallback in torch's order: equal up to rounding.
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-3)  # |dot| ~ sqrt(H) = 32
    stats = ops.output_cache_stats()
    assert stats["hits"] > 0 and stats["misses"] - before < len(pairs), "outputs did not come from the cache"


def test_permute_unpermute_against_megatron_at_cached_sizes():
    # E = 64: whole 8-byte words of the map; H = 128 keeps the probs gradient (a dot over H) within tolerance.
    routing_map_TE, probs_TE = topk_routing(8192, 64, 2, seed=9)
    tokens_TH = torch.randn(8192, 128, generator=torch.Generator().manual_seed(1))
    check_against_megatron(tokens_TH, routing_map_TE, probs_TE, backend="extension")
    check_against_megatron(tokens_TH, routing_map_TE, probs_TE, backend="extension", merge_with_probs=False)
    # fp32 forward, weighted merge: no FMA contraction (setup.py), so bitwise megatron's mul + scatter_add.
    permuted_NH, permuted_probs_N, idx_N = ops.permute(tokens_TH, routing_map_TE, probs=probs_TE)
    ref_NH, ref_probs_N, ref_idx_N = mcore_permute(tokens_TH, routing_map_TE, probs=probs_TE)
    assert torch.equal(permuted_NH, ref_NH) and torch.equal(permuted_probs_N, ref_probs_N)
    ours_TH = ops.unpermute(permuted_NH, idx_N, tokens_TH.shape, probs=probs_TE, routing_map=routing_map_TE)
    ref_TH = moe_utils.unpermute(ref_NH, ref_idx_N, tokens_TH.shape, probs=probs_TE, routing_map=routing_map_TE)
    assert torch.equal(ours_TH, ref_TH)


@pytest.mark.parametrize("num_experts", [7, 8, 17, 64])
def test_permute_index_sparse_scan(num_experts):
    gen = torch.Generator().manual_seed(num_experts)
    for density in (0.0, 0.05, 0.5, 1.0):
        routing_map_TE = torch.rand(5000, num_experts, generator=gen) < density  # 3 chunks of tokens
        for capacity in (-1, 100):
            ours = ext.permute_index(routing_map_TE, capacity)
            ref = fallback.permute_index(routing_map_TE, capacity)
            assert all(torch.equal(a, b) for a, b in zip(ours, ref)), (density, capacity)


def test_cached_tensors_are_ordinary(cache_limit):
    ops.set_output_cache_limit(256 * MIB)
    src_TH = torch.randn(2048, 1024)
    idx_N = torch.randperm(2048, generator=torch.Generator().manual_seed(0))
    y_NH = ext.gather_rows(src_TH, idx_N, None)
    expected = src_TH[idx_N]
    ops.empty_output_cache()  # frees cached free blocks only: y_NH stays valid
    assert torch.equal(y_NH, expected)
    buffer = io.BytesIO()
    torch.save(y_NH, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), expected)
    assert torch.equal(y_NH.clone(), expected)
    y_NH.resize_(4096, 1024)  # storage grows through the same allocator
    assert torch.equal(y_NH[:2048], expected)
    y_NH.requires_grad_()
    (y_NH * 2).sum().backward()
    assert torch.equal(y_NH.grad, torch.full_like(y_NH, 2.0))


def test_cache_reuse_limit_and_release(cache_limit):
    src_TH = torch.randn(1024, 1024)  # 4 MiB outputs
    idx_N = torch.arange(1024)
    ops.set_output_cache_limit(64 * MIB)
    ops.empty_output_cache()
    assert ops.output_cache_stats()["cached_bytes"] == 0
    y = ext.gather_rows(src_TH, idx_N, None)
    address = y.data_ptr()
    del y
    assert ops.output_cache_stats()["cached_bytes"] == 4 * MIB
    hits = ops.output_cache_stats()["hits"]
    y = ext.gather_rows(src_TH, idx_N, None)
    assert y.data_ptr() == address and ops.output_cache_stats()["hits"] == hits + 1
    assert torch.equal(y, src_TH)
    # A block is not spent on a much smaller request.
    z = ext.gather_rows(torch.randn(8192, 1024), torch.arange(8192), None)  # 32 MiB
    del z
    small = ext.gather_rows(src_TH, idx_N, None)
    assert ops.output_cache_stats()["cached_bytes"] == 32 * MIB
    del small, y
    # Over the limit: the least recently freed blocks go.
    ops.set_output_cache_limit(10 * MIB)
    assert ops.output_cache_stats()["cached_bytes"] <= 10 * MIB
    ops.set_output_cache_limit(0)
    assert ops.output_cache_stats()["cached_bytes"] == 0
    y = ext.gather_rows(src_TH, idx_N, None)
    del y
    assert ops.output_cache_stats()["cached_bytes"] == 0
    ops.set_output_cache_limit(64 * MIB)
    ext.gather_rows(src_TH, idx_N, None)
    assert ops.empty_output_cache() == 4 * MIB
    with pytest.raises(ValueError, match="must be >= 0"):
        ops.set_output_cache_limit(-1)
