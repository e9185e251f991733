"""ops.permute / ops.unpermute against megatron-core's moe_utils, the fast path, backends and errors.

Legend: T tokens, H hidden size, E experts, K experts per token, N permuted rows.
"""

import logging

import pytest
import torch

from megatron.core.transformer.moe import moe_utils

from megatron_taskmoe.compat.moe import mcore_permute
from megatron_taskmoe.ops import backend as backend_mod
from megatron_taskmoe.ops import extension_available, permute, unpermute
from megatron_taskmoe.ops.fallback import gather_sum, inverse_index
from tests.helpers.permute_reference import check_against_megatron, topk_routing

BACKENDS = ["extension", "torch"]


@pytest.fixture(scope="module", autouse=True)
def _require_extension():
    # The extension is part of the build (setup.py): its absence is a build failure, not a reason to skip.
    assert extension_available(), (
        "megatron_taskmoe.ops._permute_ext is not built: pip install --no-build-isolation -e ."
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("topk", [1, 2, 4])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5], ids=["dropless", "cap1.0", "cap0.5"])
def test_matches_megatron(backend, dtype, topk, capacity_factor):
    num_tokens, hidden, num_experts = 53, 40, 8
    seed = topk * 100 + (0 if capacity_factor is None else int(capacity_factor * 10))
    routing_map_TE, probs_TE = topk_routing(num_tokens, num_experts, topk, seed)
    tokens_TH = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if capacity_factor is None:
        check_against_megatron(tokens_TH, routing_map_TE, probs_TE, backend=backend)
        check_against_megatron(tokens_TH, routing_map_TE, probs_TE, backend=backend, merge_with_probs=False)
        check_against_megatron(tokens_TH, routing_map_TE, None, backend=backend)
    else:
        capacity = moe_utils.get_capacity(num_tokens * topk, num_experts, capacity_factor)
        for merge in (True, False):
            check_against_megatron(
                tokens_TH, routing_map_TE, probs_TE, num_out_tokens=capacity * num_experts, drop_and_pad=True,
                backend=backend, merge_with_probs=merge,
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_and_pad_without_num_out_tokens_is_dropless(backend):
    routing_map_TE, probs_TE = topk_routing(31, 4, 2, seed=3)
    tokens_TH = torch.randn(31, 16)
    # (megatron's unpermute cannot merge probs for this combination: its drop_and_pad branch needs a capacity)
    check_against_megatron(
        tokens_TH, routing_map_TE, probs_TE, drop_and_pad=True, backend=backend, merge_with_probs=False
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [1, 2])
def test_uniform_routing_fast_path(backend, topk):
    num_tokens, hidden, num_experts = 24, 16, 6
    routing_map_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing_map_TE[:, [4, 1][:topk]] = True
    probs_TE = torch.rand(num_tokens, num_experts) * routing_map_TE
    tokens_TH = torch.randn(num_tokens, hidden)
    check_against_megatron(tokens_TH, routing_map_TE, probs_TE, backend=backend)
    check_against_megatron(tokens_TH, routing_map_TE, probs_TE, backend=backend, merge_with_probs=False)

    permuted_NH, _, sorted_indices_N = permute(tokens_TH, routing_map_TE, probs=probs_TE, backend=backend)
    if topk == 1:
        # No data moves at all: permute and the probability-free unpermute are views.
        assert permuted_NH.data_ptr() == tokens_TH.data_ptr()
        restored_TH = unpermute(permuted_NH, sorted_indices_N, tokens_TH.shape, backend=backend)
        assert restored_TH.data_ptr() == tokens_TH.data_ptr()
    else:
        assert torch.equal(permuted_NH.view(topk, num_tokens, hidden), tokens_TH.expand(topk, -1, -1))


def test_fast_path_index_is_recognised_without_reading_it(monkeypatch):
    # On a GPU, reading the index to find out that it is arange(T) would synchronise with the host; the index the
    # top-1 fast path made is known by construction.
    routing_map_TE = torch.zeros(10, 4, dtype=torch.bool)
    routing_map_TE[:, 1] = True
    tokens_TH = torch.randn(10, 8)
    permuted_NH, _, sorted_indices_N = permute(tokens_TH, routing_map_TE)

    def no_scan(*args):
        raise AssertionError("unpermute read the index values")

    monkeypatch.setattr(torch, "equal", no_scan)
    restored_TH = unpermute(permuted_NH, sorted_indices_N, tokens_TH.shape)
    assert restored_TH.data_ptr() == tokens_TH.data_ptr()
    with pytest.raises(AssertionError, match="read the index values"):  # any other index is scanned (on CPU)
        unpermute(permuted_NH, torch.arange(10), tokens_TH.shape)


def test_fast_path_off_gives_same_result():
    routing_map_TE = torch.zeros(10, 4, dtype=torch.bool)
    routing_map_TE[:, 2] = True
    tokens_TH = torch.randn(10, 8)
    permuted_NH, _, sorted_indices_N = permute(tokens_TH, routing_map_TE, fast_path=False)
    assert permuted_NH.data_ptr() != tokens_TH.data_ptr()
    assert torch.equal(permuted_NH, tokens_TH) and torch.equal(sorted_indices_N, torch.arange(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_experts_and_single_expert(backend):
    num_tokens, hidden, num_experts = 20, 8, 5
    tokens_TH = torch.randn(num_tokens, hidden)
    routing_map_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing_map_TE[::2, 3] = True  # expert 3 gets half the tokens; the others none; odd tokens go nowhere
    probs_TE = torch.rand(num_tokens, num_experts)
    check_against_megatron(tokens_TH, routing_map_TE, probs_TE, backend=backend)
    check_against_megatron(
        tokens_TH, routing_map_TE, probs_TE, num_out_tokens=4 * num_experts, drop_and_pad=True, backend=backend
    )
    nobody_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    check_against_megatron(tokens_TH, nobody_TE, probs_TE, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    tokens_TH = torch.randn(0, 8, requires_grad=True)
    routing_map_TE = torch.zeros(0, 4, dtype=torch.bool)
    permuted_NH, permuted_probs_N, sorted_indices_N = permute(
        tokens_TH, routing_map_TE, probs=torch.zeros(0, 4), backend=backend
    )
    assert permuted_NH.shape == (0, 8) and permuted_probs_N.shape == (0,) and sorted_indices_N.shape == (0,)
    out_TH = unpermute(permuted_NH, sorted_indices_N, tokens_TH.shape, backend=backend)
    assert out_TH.shape == (0, 8)
    out_TH.sum().backward()
    assert tokens_TH.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_deterministic_across_threads(backend):
    routing_map_TE, probs_TE = topk_routing(300, 8, 4, seed=7)
    permuted_NH = torch.randn(int(routing_map_TE.sum()), 64)
    _, _, sorted_indices_N = permute(torch.randn(300, 64), routing_map_TE, backend=backend)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            outs.append(unpermute(permuted_NH, sorted_indices_N, (300, 64), probs=probs_TE,
                                  routing_map=routing_map_TE, backend=backend))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_extension_matches_fallback_primitives():
    gen = torch.Generator().manual_seed(11)
    sorted_indices_N = torch.randint(0, 50, (400,), generator=gen)
    src_NH = torch.randn(400, 33, generator=gen)
    weights_N = torch.rand(400, generator=gen)
    row_ptr, slots = torch.ops.taskmoe.inverse_index(sorted_indices_N, 50)
    ref_ptr, ref_slots = inverse_index(sorted_indices_N, 50)
    assert torch.equal(row_ptr, ref_ptr) and torch.equal(slots, ref_slots)
    for w in (None, weights_N):
        torch.testing.assert_close(
            torch.ops.taskmoe.gather_sum(src_NH, row_ptr, slots, w, 50),
            gather_sum(src_NH, ref_ptr, ref_slots, w, 50),
            atol=1e-6, rtol=1e-6,
        )


def test_probs_in_float64_and_fp16_tokens():
    routing_map_TE, probs_TE = topk_routing(40, 4, 2, seed=5)
    check_against_megatron(torch.randn(40, 12).half(), routing_map_TE, probs_TE.double(), backend="extension")


def test_bad_inputs_raise_clear_errors():
    tokens_TH = torch.randn(6, 4)
    routing_map_TE = torch.ones(6, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="routing_map must be 2-D"):
        permute(tokens_TH, routing_map_TE[:, 0])
    with pytest.raises(ValueError, match="rows but tokens has"):
        permute(tokens_TH, routing_map_TE[:5])
    with pytest.raises(ValueError, match="probs must have the routing map's shape"):
        permute(tokens_TH, routing_map_TE, probs=torch.rand(6, 3))
    with pytest.raises(ValueError, match="Mask must be provided"):
        unpermute(torch.randn(12, 4), torch.arange(12) % 6, (6, 4), probs=torch.rand(6, 2))
    with pytest.raises(ValueError, match="restore_shape"):
        unpermute(torch.randn(12, 4), torch.arange(12) % 6, (6, 5))
    with pytest.raises(RuntimeError, match="out of range"):
        unpermute(torch.randn(3, 4), torch.tensor([0, 9, 1]), (6, 4), backend="extension")
    with pytest.raises(IndexError, match="outside"):
        unpermute(torch.randn(3, 4), torch.tensor([0, 9, 1]), (6, 4), backend="torch")
    with pytest.raises(ValueError, match="permute backend must be one of"):
        permute(tokens_TH, routing_map_TE, backend="cuda")


def test_fallback_used_with_one_log_line_when_extension_missing(monkeypatch, caplog):
    monkeypatch.setattr(backend_mod, "_loaded", None)
    monkeypatch.setattr(backend_mod, "EXTENSION_MODULE", "megatron_taskmoe.ops._no_such_extension")
    routing_map_TE, probs_TE = topk_routing(16, 4, 2, seed=1)
    tokens_TH = torch.randn(16, 8)
    with caplog.at_level(logging.WARNING, logger=backend_mod.__name__):
        for _ in range(3):
            permuted_NH, _, _ = permute(tokens_TH, routing_map_TE, probs=probs_TE)
    assert backend_mod.resolved_backend("auto", tokens_TH) == "torch"
    records = [r for r in caplog.records if "pure-torch fallback" in r.getMessage()]
    assert len(records) == 1
    reference_NH, _, _ = mcore_permute(tokens_TH, routing_map_TE, probs=probs_TE)
    assert torch.equal(permuted_NH, reference_NH)
    with pytest.raises(RuntimeError, match="'extension' requested but"):
        permute(tokens_TH, routing_map_TE, backend="extension")
