"""Task adapters on a tiny decoder-side configuration, with the router whose task table they may share: what
tests/unit/test_adapters.py and test_routing_telemetry.py build (no process group).

Legend: S length, B batch, D model dim, G tasks.
"""

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_taskmoe.model.adapters import TaskAdapters
from megatron_taskmoe.model.moe_config import AdapterConfig, MoEConfig, RoutingConfig
from megatron_taskmoe.model.router import TaskTopKRouter
from megatron_taskmoe.model.task_context import TaskContext

S, B, D, G = 5, 4, 16, 6
TASKS = torch.tensor([0, 5, 3, 0])


def make(mode, topk=1, routing_mode="task_token"):
    routing = RoutingConfig(mode=routing_mode, task_embed_dim=8)
    moe = MoEConfig(
        num_experts=4,
        topk=2,
        num_tasks=G,
        num_languages=3,
        encoder=routing,
        decoder=routing,
        adapters=AdapterConfig(mode=mode, task_embed_dim=8, hidden_size=12, topk=topk),
    )
    config = TransformerConfig(
        num_layers=2, hidden_size=D, num_attention_heads=2, use_cpu_initialization=True, **moe.megatron_kwargs()
    )
    ctx = TaskContext()
    torch.manual_seed(0)
    router = TaskTopKRouter(
        config,
        ProcessGroupCollection(tp=None, cp=None, tp_cp=None, tp_dp_cp=None),
        moe_config=moe,
        side="decoder",
        task_context=ctx,
    )
    shared = router.task_table if mode == "shared_dynamic" else None
    adapters = TaskAdapters(config, moe_config=moe, side="decoder", task_context=ctx, shared_task_table=shared)
    return adapters, router, ctx


def h_input(seed=2):
    return torch.randn(S, B, D, generator=torch.Generator().manual_seed(seed))
