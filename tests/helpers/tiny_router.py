"""A TaskTopKRouter on a tiny configuration and its inputs: what tests/unit/test_router.py and
test_routing_telemetry.py route (no process group: megatron's router only stores the groups it is given).

Legend: S length, B batch, D model dim, E experts.
"""

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_taskmoe.model.moe_config import MoEConfig, RoutingConfig
from megatron_taskmoe.model.router import TaskTopKRouter
from megatron_taskmoe.model.task_context import TaskContext

S, B, D, E = 6, 4, 16, 4
TASKS = torch.tensor([0, 2, 0, 1])


def make_router(mode, *, topk=2, capacity_factor=None, z=1e-3, side="encoder", **moe_kwargs):
    routing = RoutingConfig(mode=mode, task_embed_dim=8)
    moe = MoEConfig(
        num_experts=E,
        topk=topk,
        capacity_factor=capacity_factor,
        z_loss_coeff=z,
        num_tasks=3,
        num_languages=3,
        encoder=routing,
        decoder=routing,
        **moe_kwargs,
    )
    config = TransformerConfig(
        num_layers=2, hidden_size=D, num_attention_heads=2, use_cpu_initialization=True, **moe.megatron_kwargs()
    )
    groups = ProcessGroupCollection(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)
    ctx = TaskContext()
    torch.manual_seed(0)
    router = TaskTopKRouter(config, groups, moe_config=moe, side=side, task_context=ctx)
    router.set_layer_number(1)
    return router, ctx


def inputs(seed=1):
    x_SBD = torch.randn(S, B, D, generator=torch.Generator().manual_seed(seed))
    pad_BS = torch.zeros(B, S, dtype=torch.bool)
    pad_BS[1, 4:] = True
    pad_BS[3, 2:] = True
    return x_SBD, pad_BS
