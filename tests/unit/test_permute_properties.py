"""Property tests (hypothesis): ops.permute/unpermute equal megatron-core's over arbitrary shapes and routing maps.

Routing maps are drawn freely (any number of experts per token, empty experts, all tokens on one expert, tokens
routed nowhere), with and without drop-and-pad capacity, in fp32 and bf16, on both backends.

Legend: T tokens, H hidden size, E experts, N permuted rows.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_taskmoe.ops import permute, unpermute
from tests.helpers.permute_reference import check_against_megatron

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def routing_problems(draw):
    num_tokens = draw(st.integers(1, 40))
    num_experts = draw(st.integers(1, 9))
    hidden = draw(st.sampled_from([1, 3, 8, 17, 32]))
    kind = draw(st.sampled_from(["random", "one_expert", "empty_experts", "uniform", "none"]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        density = draw(st.floats(0.0, 1.0))
        routing_map_TE = torch.rand(num_tokens, num_experts, generator=gen) < density
    elif kind == "one_expert":
        routing_map_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
        routing_map_TE[:, draw(st.integers(0, num_experts - 1))] = True
    elif kind == "empty_experts":
        routing_map_TE = torch.rand(num_tokens, num_experts, generator=gen) < 0.5
        routing_map_TE[:, torch.rand(num_experts, generator=gen) < 0.5] = False
    elif kind == "uniform":
        row_E = torch.rand(num_experts, generator=gen) < 0.5
        routing_map_TE = row_E.unsqueeze(0).expand(num_tokens, -1).clone()
    else:
        routing_map_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    probs_TE = torch.rand(num_tokens, num_experts, generator=gen) * routing_map_TE
    tokens_TH = torch.randn(num_tokens, hidden, generator=gen)
    capacity = draw(st.one_of(st.none(), st.integers(0, num_tokens)))
    return tokens_TH, routing_map_TE, probs_TE, capacity, seed


@SETTINGS
@given(
    problem=routing_problems(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    backend=st.sampled_from(["extension", "torch"]),
    merge_with_probs=st.booleans(),
)
def test_matches_megatron_on_any_routing(problem, dtype, backend, merge_with_probs):
    tokens_TH, routing_map_TE, probs_TE, capacity, seed = problem
    num_experts = routing_map_TE.shape[1]
    drop_and_pad = capacity is not None
    check_against_megatron(
        tokens_TH.to(dtype),
        routing_map_TE,
        probs_TE,
        num_out_tokens=None if capacity is None else capacity * num_experts,
        drop_and_pad=drop_and_pad,
        backend=backend,
        merge_with_probs=merge_with_probs,
        seed=seed,
    )


@SETTINGS
@given(problem=routing_problems())
def test_unpermute_inverts_permute_and_backends_agree(problem):
    tokens_TH, routing_map_TE, probs_TE, _, _ = problem
    # Dropless, unit weights: every routed token comes back multiplied by its number of experts.
    results = []
    for backend in ("extension", "torch"):
        permuted_NH, _, sorted_indices_N = permute(tokens_TH, routing_map_TE, backend=backend)
        restored_TH = unpermute(permuted_NH, sorted_indices_N, tokens_TH.shape, backend=backend)
        results.append(restored_TH)
        count_T1 = routing_map_TE.sum(1, keepdim=True).to(tokens_TH.dtype)
        torch.testing.assert_close(restored_TH, tokens_TH * count_T1)
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
