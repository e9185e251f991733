"""The pure routing maths (megatron_taskmoe/model/routing.py), each function alone.

Legend: T tokens, S length, B batch, D model dim, E experts, G tasks, C task embedding dim.
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    topk_routing_with_score_function,
    z_loss_func,
)

from megatron_taskmoe.model import routing as R


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_routing_matches_megatron(topk, renormalize):
    logits_TE = torch.randn(40, 6, generator=_gen(topk))
    probs_TE, map_TE = R.topk_routing(logits_TE, topk, renormalize=renormalize)
    ref_probs, ref_map = topk_routing_with_score_function(logits_TE, topk, use_pre_softmax=not renormalize)
    assert torch.equal(map_TE, ref_map)
    torch.testing.assert_close(probs_TE, ref_probs)
    assert (map_TE.sum(-1) == topk).all()
    if renormalize:
        torch.testing.assert_close(probs_TE.sum(-1), torch.ones(40))
    else:  # raw softmax probabilities of the chosen experts
        full = torch.softmax(logits_TE, -1)
        torch.testing.assert_close(probs_TE[map_TE], full[map_TE])


def test_topk_routing_rejects_bad_k():
    with pytest.raises(ValueError, match="topk=5"):
        R.topk_routing(torch.zeros(3, 4), 5)


def test_expert_capacity_rule():
    assert R.expert_capacity(num_tokens=10, num_experts=4, topk=2, capacity_factor=1.0) == 5
    assert R.expert_capacity(num_tokens=10, num_experts=4, topk=1, capacity_factor=1.5) == 4  # ceil(3.75)


@pytest.mark.parametrize("pad_to_capacity", [False, True])
def test_drop_by_probs_matches_megatron(pad_to_capacity):
    logits_TE = torch.randn(32, 4, generator=_gen(3)) * 3
    probs_TE, map_TE = R.topk_routing(logits_TE, 2)
    capacity = R.expert_capacity(32, 4, 2, 0.75)
    kept_probs, kept_map = R.drop_over_capacity(probs_TE, map_TE, capacity, "probs", pad_to_capacity)
    ref_probs, ref_map = apply_router_token_dropping(
        probs_TE, map_TE, router_topk=2, capacity_factor=0.75, drop_policy="probs", pad_to_capacity=pad_to_capacity
    )
    assert torch.equal(kept_map, ref_map)
    torch.testing.assert_close(kept_probs, ref_probs)
    assert (kept_map.sum(0) <= capacity).all()
    if pad_to_capacity:
        assert (kept_map.sum(0) == capacity).all()


def test_drop_by_position_keeps_earliest_and_is_deterministic_under_ties():
    # Every token picks expert 0 with the same probability (as in task routing): the earliest ones stay.
    logits_TE = torch.tensor([[2.0, 0.0, -1.0]]).repeat(10, 1)
    probs_TE, map_TE = R.topk_routing(logits_TE, 1)
    for policy in ("position", "probs"):
        _, kept = R.drop_over_capacity(probs_TE, map_TE, capacity=4, drop_policy=policy)
        assert kept[:, 0].nonzero().squeeze(-1).tolist() == [0, 1, 2, 3]
        assert kept[:, 1:].sum() == 0


def test_padding_never_displaces_real_tokens():
    logits_TE = torch.tensor([[3.0, 0.0]] * 4 + [[1.0, 0.0]] * 4)  # padding tokens first, with higher probs
    probs_TE, map_TE = R.topk_routing(logits_TE, 1)
    valid_T = torch.tensor([False] * 4 + [True] * 4)
    _, kept = R.drop_over_capacity(probs_TE, map_TE, capacity=4, drop_policy="probs", valid_T=valid_T)
    assert kept[:, 0].nonzero().squeeze(-1).tolist() == [4, 5, 6, 7]


def test_drop_is_a_noop_when_capacity_exceeds_tokens():
    probs_TE, map_TE = R.topk_routing(torch.randn(6, 3, generator=_gen(1)), 2)
    kept_probs, kept_map = R.drop_over_capacity(probs_TE, map_TE, capacity=7)
    assert torch.equal(kept_map, map_TE) and torch.equal(kept_probs, probs_TE)


def test_sentence_masked_sum_excludes_padding_and_splits_over_shards():
    x_SBD = torch.randn(6, 3, 5, generator=_gen(4))
    pad_SB = torch.zeros(6, 3, dtype=torch.bool)
    pad_SB[4:, 0] = True
    pad_SB[1:, 2] = True
    sum_BD, count_B = R.sentence_masked_sum(x_SBD, pad_SB)
    assert count_B.tolist() == [4, 6, 1]
    torch.testing.assert_close(R.sentence_mean(sum_BD, count_B)[0], x_SBD[:4, 0].mean(0))
    torch.testing.assert_close(R.sentence_mean(sum_BD, count_B)[2], x_SBD[0, 2])
    # Sequence-parallel split (contiguous halves of S): the shards' sums add up to the whole.
    s0, c0 = R.sentence_masked_sum(x_SBD[:3], pad_SB[:3])
    s1, c1 = R.sentence_masked_sum(x_SBD[3:], pad_SB[3:])
    torch.testing.assert_close(s0 + s1, sum_BD)
    torch.testing.assert_close(c0 + c1, count_B)


def test_sentence_mean_of_all_padding_sentence_is_zero_not_nan():
    mean_BD = R.sentence_mean(torch.zeros(2, 3), torch.tensor([0.0, 2.0]))
    assert torch.isfinite(mean_BD).all()


def test_sentence_logits_identical_within_a_sentence_in_s_major_order():
    mean_BD = torch.randn(3, 4, generator=_gen(5))
    weight_ED = torch.randn(5, 4, generator=_gen(6))
    logits_TE = R.sentence_logits(mean_BD, seq_len=7, weight_ED=weight_ED)
    assert logits_TE.shape == (21, 5)
    by_sb = logits_TE.reshape(7, 3, 5)  # t = s*B + b
    for b in range(3):
        torch.testing.assert_close(by_sb[:, b], (mean_BD[b] @ weight_ED.T).expand(7, 5))


def test_expand_per_sequence_is_s_major():
    ids_B = torch.tensor([7, 8, 9])
    assert R.expand_per_sequence(ids_B, 2).tolist() == [7, 8, 9, 7, 8, 9]


def test_task_logits_same_row_per_task():
    emb_GC = torch.randn(4, 3, generator=_gen(7))
    weight_EC = torch.randn(6, 3, generator=_gen(8))
    table_GE = R.task_logit_table(emb_GC, weight_EC)
    ids_T = torch.tensor([2, 0, 2, 3, 2])
    logits_TE = R.task_logits(table_GE, ids_T)
    torch.testing.assert_close(logits_TE[0], logits_TE[2])
    torch.testing.assert_close(logits_TE[0], emb_GC[2] @ weight_EC.T)
    with pytest.raises(ValueError, match="outside the task table"):
        R.task_logits(table_GE, torch.tensor([4]))


@pytest.mark.parametrize("topk", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [True, False])
def test_task_route_is_every_token_of_the_task_routed(topk, renormalize):
    """The fixed route of a task row (what a one-task micro-batch's tokens all take) equals, bit for bit, the
    nonzeros of the per-token routing of that task's tokens: the same experts in ascending order, the same weights."""
    table_GE = torch.randn(4, 8, generator=_gen(7))
    table_GE[3, 5] = table_GE[3, 2]  # a tie: broken as topk breaks it
    ids_T = torch.tensor([0, 1, 2, 3, 3, 1])
    probs_TE, map_TE = R.topk_routing(R.task_logits(table_GE, ids_T), topk, renormalize=renormalize)
    for t, row in enumerate(ids_T.tolist()):
        experts_K, probs_K = R.task_route(table_GE, row, topk, renormalize=renormalize)
        assert experts_K.tolist() == map_TE[t].nonzero().squeeze(-1).tolist()
        assert torch.equal(probs_K, probs_TE[t, experts_K])
    with pytest.raises(ValueError, match="task row 4 outside the task table's 4 rows"):
        R.task_route(table_GE, 4, topk)


def test_task_token_logits_see_token_and_task():
    x_TD = torch.randn(5, 4, generator=_gen(9))
    emb_TC = torch.randn(5, 2, generator=_gen(10))
    weight = torch.randn(3, 6, generator=_gen(11))
    logits_TE = R.task_token_logits(x_TD, emb_TC, weight)
    torch.testing.assert_close(logits_TE, x_TD @ weight[:, :4].T + emb_TC @ weight[:, 4:].T)
    with pytest.raises(ValueError, match="D \\+ C"):
        R.task_token_logits(x_TD, emb_TC, torch.randn(3, 5))


def test_z_loss_matches_megatron_and_excludes_padding():
    logits_TE = torch.randn(12, 4, generator=_gen(12))
    pad_T = torch.zeros(12, dtype=torch.bool)
    pad_T[8:] = True
    ref = z_loss_func(logits_TE, 1.0, padding_mask=pad_T)
    torch.testing.assert_close(R.z_loss(logits_TE, ~pad_T), ref)
    torch.testing.assert_close(R.z_loss(logits_TE, ~pad_T), R.z_loss(logits_TE[:8]))


def test_gshard_loss_shards_sum_to_the_whole():
    """Sequence parallelism: local probability sums with globally reduced counts add up to the global loss."""
    logits_TE = torch.randn(20, 4, generator=_gen(13))
    pad_T = torch.zeros(20, dtype=torch.bool)
    pad_T[[3, 9, 17]] = True
    whole = R.gshard_load_balancing_loss_from_logits(logits_TE, pad_T)
    scores_TE = torch.softmax(logits_TE, -1)
    halves = [slice(0, 10), slice(10, 20)]
    stats = [R.top1_counts(scores_TE[h], ~pad_T[h]) for h in halves]
    counts_E = sum(c for c, _ in stats)
    num = sum(n for _, n in stats)
    parts = [R.gshard_load_balancing_loss(scores_TE[h], counts_E, num, ~pad_T[h]) for h in halves]
    torch.testing.assert_close(parts[0] + parts[1], whole)


def test_gshard_loss_is_one_for_a_uniform_router():
    assert R.gshard_load_balancing_loss_from_logits(torch.zeros(8, 4)).item() == pytest.approx(1.0)
