"""Task adapters (Pham et al. 2023, section 3): static, dynamic, shared-dynamic.

Legend: S length, B batch, D model dim, T = S*B tokens, A adapters, G tasks.
"""

import math

import pytest
import torch

from megatron_taskmoe.model.adapters import adapter_choice, bottleneck
from tests.helpers.tiny_adapters import B, G, S, TASKS, h_input, make


def as_trained(adapters):
    """Give the zero-initialised up-projections the values training would (random ones)."""
    with torch.no_grad():
        adapters.up_AHD.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(4))
    return adapters


@pytest.mark.parametrize("mode", ["static", "dynamic", "shared_dynamic"])
def test_a_new_adapter_has_no_effect(mode):
    adapters, _, ctx = make(mode)
    assert adapters.up_AHD.abs().sum() == 0 and adapters.down_ADH.abs().sum() > 0
    h_SBD = h_input()
    with ctx.micro_batch(task_ids_B=TASKS):
        torch.testing.assert_close(adapters(h_SBD), h_SBD, atol=0, rtol=0)


def test_number_of_dynamic_adapters_is_ceil_log2_tasks():
    adapters, _, _ = make("dynamic")
    assert adapters.num_adapters == math.ceil(math.log2(G)) == 3
    static, _, _ = make("static")
    assert static.num_adapters == G


@pytest.mark.parametrize("mode,topk", [("static", 1), ("dynamic", 1), ("dynamic", 2), ("shared_dynamic", 1)])
def test_every_mode_forward_backward(mode, topk):
    adapters, router, ctx = make(mode, topk)
    as_trained(adapters)
    h_SBD = h_input().requires_grad_(True)
    with ctx.micro_batch(task_ids_B=TASKS):
        out_SBD = adapters(h_SBD)
    assert out_SBD.shape == h_SBD.shape
    assert not torch.allclose(out_SBD, h_SBD)
    out_SBD.square().sum().backward()
    assert h_SBD.grad.abs().sum() > 0
    assert adapters.down_ADH.grad.abs().sum() > 0 and adapters.up_AHD.grad.abs().sum() > 0
    if mode != "static":
        assert adapters.gate_weight.grad.abs().sum() > 0
        table = router.task_embedding if mode == "shared_dynamic" else adapters.task_embedding
        assert table.grad is not None and table.grad.abs().sum() > 0
    for p in adapters.parameters():
        assert hasattr(p, "sequence_parallel")


def test_static_adapter_is_the_tasks_own():
    adapters, _, ctx = make("static")
    as_trained(adapters)
    h_SBD = h_input()
    with ctx.micro_batch(task_ids_B=TASKS):
        out_SBD = adapters(h_SBD)
    for b, task in enumerate(TASKS.tolist()):
        a = task
        expected = h_SBD[:, b] + bottleneck(
            h_SBD[:, b],
            adapters.ln_weight_AD[a],
            adapters.ln_bias_AD[a],
            adapters.down_ADH[a],
            adapters.down_bias_AH[a],
            adapters.up_AHD[a],
            adapters.up_bias_AD[a],
            adapters.eps,
        )
        torch.testing.assert_close(out_SBD[:, b], expected)
    # Another task's adapter has no influence.
    with torch.no_grad():
        adapters.up_AHD[1].add_(10.0)
    with ctx.micro_batch(task_ids_B=TASKS):
        torch.testing.assert_close(adapters(h_SBD), out_SBD)


@pytest.mark.parametrize("mode", ["static", "dynamic", "shared_dynamic"])
def test_a_sequence_output_does_not_depend_on_the_rest_of_the_batch(mode):
    adapters, _, ctx = make(mode, topk=2 if mode != "static" else 1)
    as_trained(adapters)
    h_SBD = h_input()
    with ctx.micro_batch(task_ids_B=TASKS):
        full = adapters(h_SBD)
    with ctx.micro_batch(task_ids_B=TASKS[2:3]):
        alone = adapters(h_SBD[:, 2:3].contiguous())
    torch.testing.assert_close(alone[:, 0], full[:, 2])


def test_shared_dynamic_uses_the_routers_table_without_owning_it():
    adapters, router, ctx = make("shared_dynamic")
    assert adapters.task_table() is router.task_embedding
    assert all(p is not router.task_embedding for p in adapters.parameters())
    assert adapters.task_embedding is None


def test_adapter_choice_top_k_weights_are_softmax_probabilities():
    logits_TA = torch.randn(7, 3, generator=torch.Generator().manual_seed(3))
    weights_TA, map_TA = adapter_choice(logits_TA, 2)
    assert (map_TA.sum(-1) == 2).all()
    torch.testing.assert_close(weights_TA[map_TA], torch.softmax(logits_TA, -1)[map_TA])
    assert (weights_TA[~map_TA] == 0).all()


def test_stats_count_adapter_choice_per_task_without_padding():
    adapters, _, ctx = make("dynamic")
    adapters.collect_stats = True
    adapters.init_stats(torch.device("cpu"))
    pad_LB = torch.zeros(S, B, dtype=torch.bool)
    pad_LB[3:, 1] = True
    with ctx.micro_batch(task_ids_B=TASKS):
        adapters(h_input(), pad_LB)
    real_B = (~pad_LB).sum(0).double()
    expected = torch.zeros(G, dtype=torch.float64).index_add_(0, TASKS, real_B)
    torch.testing.assert_close(adapters.stats_tokens_G, expected)
    torch.testing.assert_close(adapters.stats_assignments_GA.sum(-1), expected)  # top-1: one adapter per token


def test_bad_task_ids_are_reported():
    adapters, _, ctx = make("static")
    with ctx.micro_batch(task_ids_B=torch.tensor([0, G, 1, 1])):
        with pytest.raises(ValueError, match="outside the 6 task rows"):
            adapters(h_input())
