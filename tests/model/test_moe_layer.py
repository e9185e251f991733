"""megatron-core's MoELayer with our router/adapters, built from `get_moe_mlp_spec`, on CPU in one process.

megatron's MoELayer needs process groups even at world size 1: a single-process gloo group, torn down after.

Legend: S length, B batch, D model dim, T = S*B tokens, E experts, G tasks.
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_taskmoe.parallel import groups
from megatron_taskmoe.model.moe import (
    TaskMoEMLP,
    get_moe_mlp_spec,
    reset_routing_stats,
    routing_stats,
    set_routing_stats,
)
from megatron_taskmoe.model.moe_config import AdapterConfig, MoEConfig, RoutingConfig
from megatron_taskmoe.model.task_context import TaskContext

S, B, D, E, G = 6, 4, 16, 4, 3
TASKS = torch.tensor([0, 2, 0, 1])


@pytest.fixture(scope="module")
def process_groups():
    groups.init_distributed(rank=0, world_size=1, master_port=groups.free_port())
    pgs = groups.initialize_model_parallel()
    groups.model_parallel_manual_seed(1234)
    yield pgs
    groups.destroy()


def build(pgs, routing_mode="token", adapter_mode="none", topk=2, capacity_factor=None, dispatcher="alltoall",
          builder=None, eval_capacity_factor=None):
    routing = RoutingConfig(mode=routing_mode, task_embed_dim=8)
    moe = MoEConfig(
        num_experts=E,
        topk=topk,
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        z_loss_coeff=1e-3,
        token_dispatcher=dispatcher,
        num_tasks=G,
        num_languages=G,
        encoder=routing,
        decoder=routing,
        adapters=AdapterConfig(mode=adapter_mode, task_embed_dim=8, hidden_size=8),
    )
    config = TransformerConfig(
        num_layers=2,
        hidden_size=D,
        ffn_hidden_size=32,
        num_attention_heads=2,
        use_cpu_initialization=True,
        add_bias_linear=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        **moe.megatron_kwargs(),
    )
    ctx = TaskContext()
    spec = get_moe_mlp_spec(moe, "encoder", ctx, token_dispatcher_builder=builder)
    torch.manual_seed(0)
    layer = build_module(spec, config=config, pg_collection=pgs)
    layer.set_layer_number(1)
    return layer, ctx


def batch(seed=3):
    x_SBD = torch.randn(S, B, D, generator=torch.Generator().manual_seed(seed))
    pad_BS = torch.zeros(B, S, dtype=torch.bool)
    pad_BS[1, 4:] = True
    pad_BS[3, 3:] = True
    return x_SBD, pad_BS


MODES = [
    ("token", "none"),
    ("sentence", "none"),
    ("task", "none"),
    ("task_token", "none"),
    ("token", "static"),
    ("token", "dynamic"),
    ("task_token", "shared_dynamic"),
    ("task", "shared_dynamic"),
]


@pytest.mark.parametrize("routing_mode,adapter_mode", MODES)
def test_forward_backward_every_mode(process_groups, routing_mode, adapter_mode):
    layer, ctx = build(process_groups, routing_mode, adapter_mode)
    assert isinstance(layer, MoELayer)
    assert isinstance(layer, TaskMoEMLP) == (adapter_mode != "none" or routing_mode == "task")
    x_SBD, pad_BS = batch()
    x_SBD.requires_grad_(True)
    with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
        out_SBD, bias = layer(x_SBD, padding_mask=pad_BS)
    assert out_SBD.shape == x_SBD.shape and bias is None
    out_SBD.square().mean().backward()
    assert x_SBD.grad is not None and torch.isfinite(x_SBD.grad).all()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert all(g is not None for n, g in grads.items() if "router" in n), grads.keys()
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "experts" in n)
    if adapter_mode != "none":
        # A new adapter's up-projection is zero: it learns first, the down-projection after.
        assert layer.adapters.up_AHD.grad.abs().sum() > 0


def test_shared_dynamic_parameters_are_registered_once(process_groups):
    layer, _ = build(process_groups, "task_token", "shared_dynamic")
    names = [n for n, _ in layer.named_parameters()]
    assert "router.task_embedding" in names
    assert not any("adapters" in n and "task_embedding" in n for n in names)
    assert layer.adapters.task_table() is layer.router.task_embedding


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_task_routing_through_the_layer_uses_one_expert_set_per_task(process_groups, dispatcher):
    layer, ctx = build(process_groups, "task", topk=1, dispatcher=dispatcher)
    set_routing_stats(layer, True)
    x_SBD, pad_BS = batch()
    with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
        layer(x_SBD, padding_mask=pad_BS)
    stats = routing_stats(layer)
    assert list(stats) == ["router"]
    per_task_GE = stats["router"]["expert_assignments"]
    real_G = torch.zeros(G, dtype=torch.float64).index_add_(0, TASKS, (~pad_BS).sum(1).double())
    torch.testing.assert_close(stats["router"]["tokens"], real_G)
    torch.testing.assert_close(per_task_GE.sum(-1), real_G)
    assert ((per_task_GE > 0).sum(-1) <= 1).all()
    reset_routing_stats(layer)
    assert routing_stats(layer)["router"]["tokens"].sum() == 0


def test_same_sequence_same_output_regardless_of_batch_mates_dropless(process_groups):
    """Dropless routing is per token: a sequence's output cannot depend on the other sequences."""
    layer, ctx = build(process_groups, "task_token", "shared_dynamic")
    layer.eval()
    x_SBD, pad_BS = batch()
    with torch.no_grad():
        with ctx.micro_batch(task_ids_B=TASKS, src_padding_mask_BS=pad_BS):
            full, _ = layer(x_SBD, padding_mask=pad_BS)
        with ctx.micro_batch(task_ids_B=TASKS[1:2], src_padding_mask_BS=pad_BS[1:2]):
            alone, _ = layer(x_SBD[:, 1:2].contiguous(), padding_mask=pad_BS[1:2])
    torch.testing.assert_close(alone[:, 0], full[:, 1])


def test_capacity_factor_drops_tokens(process_groups):
    layer, ctx = build(process_groups, "task", topk=1, capacity_factor=1.0)
    x_SBD, _ = batch()
    with ctx.micro_batch(task_ids_B=torch.zeros(B, dtype=torch.long)):
        probs_TE, map_TE = layer.router(x_SBD)
        out_SBD, _ = layer(x_SBD)
    assert map_TE.sum() == S * B // E
    dropped_T = ~map_TE.any(-1)
    assert (out_SBD.reshape(-1, D)[dropped_T] == 0).all()  # dropped tokens contribute nothing


# ------------------------------------------------------------------------------------------ fixed route


class RouterCalls:
    """Counts the router's per-token forwards (the routed path); the fixed route does not call it."""

    def __init__(self, layer):
        self.count, forward = 0, layer.router.forward

        def counted(*args, **kwargs):
            self.count += 1
            return forward(*args, **kwargs)

        layer.router.forward = counted


def routed_and_fixed(layer, ctx, x_SBD, pad_BS, task_ids_B):
    """The layer's output with the fixed route allowed and forced off, and the router calls of the first."""
    outs, calls = [], None
    for allowed in (True, False):
        layer.use_fixed_route = allowed
        spy = RouterCalls(layer)
        with torch.no_grad(), ctx.micro_batch(task_ids_B=task_ids_B, src_padding_mask_BS=pad_BS):
            outs.append(layer(x_SBD, padding_mask=pad_BS)[0])
        calls = spy.count if allowed else calls
        del layer.router.forward
    return outs[0], outs[1], calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("dispatcher", ["ours", "megatron"])
def test_fixed_route_equals_the_routed_path(process_groups, dispatcher, topk, dtype):
    """A micro-batch of one task at inference: the task-routed layer runs the task's experts on every token
    without routing them, and gives the routed path's output bit for bit (the same operations in the same order:
    probabilities as the experts' per-token scale, fp32 sum in expert order). Through megatron's own dispatcher,
    whose unpermute sums bf16 in bf16, bf16 agrees to rounding."""
    from megatron_taskmoe.ops.dispatcher import token_dispatcher_builder

    builder = token_dispatcher_builder("auto", fast_path=True) if dispatcher == "ours" else None
    layer, ctx = build(process_groups, "task", topk=topk, builder=builder)
    layer = layer.to(dtype).eval()
    x_SBD, pad_BS = batch()
    for task in range(G):
        fixed, routed, calls = routed_and_fixed(layer, ctx, x_SBD.to(dtype), pad_BS, torch.full((B,), task))
        assert calls == 0, "the fixed route must not route tokens"
        if dispatcher == "ours" or dtype == torch.float32:
            assert torch.equal(fixed, routed), (task, (fixed.float() - routed.float()).abs().max())
        else:
            torch.testing.assert_close(fixed, routed, rtol=1.6e-2, atol=1e-2)


def test_fixed_route_only_where_every_token_takes_one_route(process_groups):
    """The layer routes per token in training, with a mixed-task batch, while counting statistics, with a capacity
    at inference, and on sides not routed by task."""
    x_SBD, pad_BS = batch()
    one_task = torch.zeros(B, dtype=torch.long)
    layer, ctx = build(process_groups, "task")
    layer.eval()
    assert routed_and_fixed(layer, ctx, x_SBD, pad_BS, one_task)[2] == 0
    fixed, routed, calls = routed_and_fixed(layer, ctx, x_SBD, pad_BS, TASKS)
    assert calls == 1 and torch.equal(fixed, routed)
    layer.train()
    assert routed_and_fixed(layer, ctx, x_SBD, pad_BS, one_task)[2] == 1
    layer.eval()
    set_routing_stats(layer, True)
    assert routed_and_fixed(layer, ctx, x_SBD, pad_BS, one_task)[2] == 1
    set_routing_stats(layer, False)
    layer, ctx = build(process_groups, "task", capacity_factor=1.0, eval_capacity_factor=1.0)
    assert routed_and_fixed(layer.eval(), ctx, x_SBD, pad_BS, one_task)[2] == 1
    layer, ctx = build(process_groups, "task_token", "shared_dynamic")
    assert not layer.use_fixed_route
