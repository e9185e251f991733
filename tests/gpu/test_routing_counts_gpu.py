"""Routing telemetry counts on a CUDA GPU without synchronising with the host (torch's sync debug mode raises on
any .item()/.tolist()/blocking copy), and equal the CPU counts. Skipped without CUDA.

Legend: T tokens, E experts, A adapters, G tasks, S length, B batch, D model dim.
"""

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_taskmoe.model import routing as R
from megatron_taskmoe.model.moe_config import MoEConfig, RoutingConfig
from megatron_taskmoe.model.router import TaskTopKRouter
from megatron_taskmoe.model.routing_counts import RoutingCounters
from megatron_taskmoe.model.task_context import TaskContext

pytestmark = pytest.mark.gpu

T, E, A, G = 64, 8, 3, 4


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(T, E, generator=g)
    valid_T = torch.rand(T, generator=g) > 0.2
    ids_T = torch.randint(0, G, (T,), generator=g)
    map_TA = torch.nn.functional.one_hot(torch.randint(0, A, (T,), generator=g), A).bool()
    probs_TE, routed_TE = R.topk_routing(logits_TE, 2)
    _, kept_TE = R.drop_over_capacity(probs_TE, routed_TE, capacity=6, valid_T=valid_T)
    return [x.to(device) for x in (logits_TE, routed_TE, kept_TE, valid_T, ids_T, map_TA)]


def _count(device, sync_mode: str):
    logits_TE, routed_TE, kept_TE, valid_T, ids_T, map_TA = _inputs(device)
    experts = RoutingCounters("experts", num_choices=E, num_task_rows=G, device=device)
    adapters = RoutingCounters("adapters", num_choices=A, num_task_rows=G, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
    try:
        for _ in range(3):  # micro-batches accumulate
            experts.add_router(logits_TE, routed_TE, kept_TE, valid_T, ids_T)
            experts.add_router(logits_TE, routed_TE, routed_TE, valid_T, ids_T)  # dropless: the same map
            adapters.add_adapters(map_TA, valid_T, ids_T)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return {**{k: v.cpu() for k, v in experts.values.items()}, **{k: v.cpu() for k, v in adapters.values.items()}}


def test_counting_never_synchronises_and_equals_the_cpu_counts():
    gpu = _count(torch.device("cuda"), "error")
    cpu = _count(torch.device("cpu"), "default")
    for key, value in cpu.items():
        torch.testing.assert_close(gpu[key], value, rtol=1e-6 if key == "entropy_sum" else 0, atol=1e-6, msg=key)


def test_router_records_telemetry_without_synchronising():
    routing = RoutingConfig(mode="task_token", task_embed_dim=8)
    moe = MoEConfig(num_experts=E, topk=2, num_tasks=G, num_languages=G, encoder=routing, decoder=routing)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                               **moe.megatron_kwargs())
    ctx = TaskContext()
    router = TaskTopKRouter(config, ProcessGroupCollection(tp=None, cp=None, tp_cp=None, tp_dp_cp=None),
                            moe_config=moe, side="encoder", task_context=ctx).cuda()
    router.init_telemetry(torch.device("cuda"))
    logits_TE, routed_TE, kept_TE, valid_T, _, _ = _inputs(torch.device("cuda"))
    task_ids_B = torch.arange(8, device="cuda") % G
    with ctx.micro_batch(task_ids_B=task_ids_B):  # the per-micro-batch id check may synchronise; counting may not
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            router._record_stats(logits_TE, routed_TE, kept_TE, valid_T, True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert router.telemetry.values["tokens"].item() == valid_T.sum().item()
    assert router.telemetry.values["task_tokens_G"].sum().item() == valid_T.sum().item()
