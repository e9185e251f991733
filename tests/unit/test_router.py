"""TaskTopKRouter alone (no process group: megatron's router only stores the groups it is given).

Legend: S length, B batch, D model dim, T = S*B tokens, E experts.
"""

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_taskmoe.model.moe_config import AdapterConfig, RoutingConfig
from megatron_taskmoe.model.router import TaskTopKRouter
from tests.helpers.tiny_router import B, D, E, S, TASKS, inputs, make_router


@pytest.mark.parametrize("mode", ["token", "sentence", "task", "task_token"])
def test_every_mode_forward_backward(mode):
    router, ctx = make_router(mode)
    x_SBD, pad_BS = inputs()
    x_SBD.requires_grad_(True)
    with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
        probs_TE, map_TE = router(x_SBD)
    assert probs_TE.shape == map_TE.shape == (S * B, E)
    assert (map_TE.sum(-1) == 2).all()
    torch.testing.assert_close(probs_TE.sum(-1), torch.ones(S * B))
    (probs_TE * torch.arange(E)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    if mode in ("task", "task_token"):
        assert router.task_embedding.grad.abs().sum() > 0
        assert getattr(router.task_embedding, "sequence_parallel") is False
    if mode != "task":
        assert x_SBD.grad.abs().sum() > 0
    assert router.last_aux_loss is not None and router.last_z_loss is not None


def test_task_routing_sends_all_tokens_of_a_task_to_the_same_experts():
    router, ctx = make_router("task")
    x_SBD, pad_BS = inputs()
    with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
        _, map_TE = router(x_SBD)
    map_SBE = map_TE.reshape(S, B, E)
    for task in TASKS.unique():
        rows = map_SBE[:, TASKS == task].reshape(-1, E)
        assert (rows == rows[0]).all()


def test_task_routing_by_target_language_uses_language_ids():
    router, ctx = make_router("task")
    router.routing_config = RoutingConfig(mode="task", task_source="target_language", task_embed_dim=8)
    x_SBD, _ = inputs()
    langs = torch.tensor([1, 1, 2, 2])
    with ctx.micro_batch(task_ids_B=torch.tensor([0, 1, 2, 0]), tgt_lang_ids_B=langs):
        _, map_TE = router(x_SBD)
    map_SBE = map_TE.reshape(S, B, E)
    assert (map_SBE[:, 0] == map_SBE[0, 1]).all() and (map_SBE[:, 2] == map_SBE[0, 3]).all()


def test_sentence_routing_sends_all_tokens_of_a_sentence_to_the_same_experts():
    router, ctx = make_router("sentence")
    x_SBD, pad_BS = inputs()
    with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
        _, map_TE = router(x_SBD)
    map_SBE = map_TE.reshape(S, B, E)
    for b in range(B):
        assert (map_SBE[:, b] == map_SBE[0, b]).all()


def test_sentence_routing_ignores_padding_representations():
    router, ctx = make_router("sentence")
    x_SBD, pad_BS = inputs()
    with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
        probs_a, _ = router(x_SBD)
        changed = x_SBD.clone()
        changed[4:, 1] += 50.0  # positions 4.. of sentence 1 are padding
        probs_b, _ = router(changed)
    torch.testing.assert_close(probs_a, probs_b)


@pytest.mark.parametrize("mode", ["token", "task_token"])
def test_padding_excluded_from_aux_and_z_loss(mode):
    router, ctx = make_router(mode)
    x_SBD, pad_BS = inputs()
    with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
        router(x_SBD)
        aux_a, z_a = router.last_aux_loss, router.last_z_loss
        changed = x_SBD.clone()
        changed[2:, 3] = 30.0 * torch.randn(S - 2, D)  # only padding positions of sentence 3
        router(changed)
    torch.testing.assert_close(router.last_aux_loss, aux_a)
    torch.testing.assert_close(router.last_z_loss, z_a)


def test_megatron_padding_mask_argument_takes_precedence_and_is_checked():
    router, ctx = make_router("token")
    x_SBD, pad_BS = inputs()
    router(x_SBD, padding_mask=pad_BS.T)  # no context needed for token routing
    aux_with_mask = router.last_aux_loss
    router(x_SBD)
    assert not torch.equal(aux_with_mask, router.last_aux_loss)
    with pytest.raises(ValueError, match="does not fit"):
        router(x_SBD, padding_mask=torch.zeros(S + 1, B, dtype=torch.bool))


def test_aux_loss_gradient_reaches_router_weights():
    router, ctx = make_router("token", z=0.0)
    x_SBD, _ = inputs()
    probs_TE, _ = router(x_SBD)
    (probs_TE * 0.0).sum().backward()  # only the attached aux loss contributes
    assert router.weight.grad.abs().sum() > 0
    # Evaluation computes no auxiliary loss.
    router.last_aux_loss = None
    router.eval()
    router(x_SBD)
    assert router.last_aux_loss is None


def test_capacity_dropping_limits_each_expert():
    router, ctx = make_router("task", topk=1, capacity_factor=1.0)
    x_SBD, pad_BS = inputs()
    with ctx.micro_batch(task_ids_B=torch.zeros(B, dtype=torch.long), src_padding_mask_BS=pad_BS):
        probs_TE, map_TE = router(x_SBD)
    capacity = S * B // E
    assert map_TE.sum(0).max() <= capacity
    assert map_TE.sum() == capacity  # one task -> one expert, filled to capacity, the rest dropped
    assert (probs_TE[~map_TE] == 0).all()


def test_task_modes_need_the_context():
    router, ctx = make_router("task")
    x_SBD, _ = inputs()
    with pytest.raises(RuntimeError, match="outside a micro-batch"):
        router(x_SBD)
    with pytest.raises(ValueError, match="needs a TaskContext"):
        TaskTopKRouter(
            router.config,
            ProcessGroupCollection(tp=None, cp=None, tp_cp=None, tp_dp_cp=None),
            moe_config=router.moe_config,
            side="encoder",
            task_context=None,
        )


def test_routing_stats_count_real_tokens_per_task():
    router, ctx = make_router("task", topk=1)
    router.collect_stats = True
    router.init_stats(torch.device("cpu"))
    x_SBD, pad_BS = inputs()
    with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
        router(x_SBD)
    real_per_seq = (~pad_BS).sum(1)
    expected_tokens = torch.zeros(3, dtype=torch.float64).index_add_(0, TASKS, real_per_seq.double())
    torch.testing.assert_close(router.stats_tokens_G, expected_tokens)
    torch.testing.assert_close(router.stats_assignments_GE.sum(-1), expected_tokens)
    assert ((router.stats_assignments_GE > 0).sum(-1) <= 1).all()  # task routing, top-1: one expert per task


def test_shared_dynamic_validation_is_enforced_by_config():
    with pytest.raises(ValueError, match="shared_dynamic"):
        make_router("token", adapters=AdapterConfig(mode="shared_dynamic", task_embed_dim=8))
