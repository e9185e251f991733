"""The MoE MLP spec of a transformer layer, and the routing statistics the trainer reads.

`get_moe_mlp_spec(moe_config, side, task_context)` returns the `ModuleSpec` for a layer's `mlp` slot:
megatron-core's `MoELayer` with our `TaskTopKRouter` (through `MoESubmodules(router=...)`) and megatron's
`SequentialMLP` local experts (plain column/row-parallel linears, which run on CPU and shard over expert-tensor
parallelism). With task adapters configured, or on a task-routed side, it is `TaskMoEMLP`, a `MoELayer` subclass,
so `TransformerLayer` still sees an MoE layer (`is_moe_layer`) with the same call signature
`(hidden_states, padding_mask=None) -> (out, bias)`. It
  * applies the adapters (`adapters.py`) to the MoE output;
  * runs a fixed route directly: at inference, a task-routed layer given a micro-batch of one task row (a batch of
    one direction, as the translator and the decoding tools form them) sends every token to the same experts with
    the same weights (`TaskTopKRouter.fixed_route`). Those experts then run on all tokens, with the arithmetic of
    the routed path (same results), without per-token routing, permutation or dispatch. Kudugunta et al.'s point:
    a task's requests need only the task's experts. On the extracted sub-network (2 experts) that is what a
    decoding step's MoE layer costs. It applies where this rank holds every expert whole (no expert or
    expert-tensor parallelism) and nothing is being counted; otherwise the layer routes as in training.

Routing statistics: `set_routing_stats(model, True)` makes every router count, per task, the real tokens
assigned to each expert (after capacity dropping), and every dynamic/static adapter block the tokens sent to each
adapter; `routing_stats(model)` returns them keyed by module name, `reset_routing_stats(model)` zeroes them.
Counts are this rank's: sum them over the tensor-parallel (sequence-parallel shards) and data-parallel ranks with
`all_reduce_routing_stats`.

Training telemetry: `set_routing_telemetry(model, True)` gives every router and dynamic adapter block running
counters (`routing_counts.RoutingCounters`: expert load before and after capacity dropping, dropped tokens, router
entropy, per-task assignments) that only training forwards add to; `routing_telemetry(model)` lists them and
`zero_routing_telemetry(model)` starts the next window (`training/routing_telemetry.py` reduces and reports them).

Legend: G tasks, E experts, A adapters.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_taskmoe.model.adapters import TaskAdapters
from megatron_taskmoe.model.linear import ColumnParallelLinear, RowParallelLinear
from megatron_taskmoe.model.moe_config import MoEConfig
from megatron_taskmoe.model.router import TaskTopKRouter
from megatron_taskmoe.model.task_context import TaskContext

DispatcherBuilder = Callable[..., object]


class TaskMoEMLP(MoELayer):
    """megatron's MoELayer, then the task adapters on its output (Pham et al.: adapters on top of the MoE layer);
    a fixed route (task routing, one task row in the micro-batch) runs its experts directly at inference.

    `token_dispatcher_builder(num_local_experts, local_expert_indices, config=..., pg_collection=...)` optionally
    replaces megatron's dispatcher (the `ops/` dispatchers)."""

    def __init__(
        self,
        config,
        submodules: MoESubmodules,
        layer_number: int | None = None,
        pg_collection=None,
        *,
        moe_config: MoEConfig,
        side: str,
        task_context: TaskContext | None,
        token_dispatcher_builder: DispatcherBuilder | None = None,
        **megatron_kwargs,
    ) -> None:
        # megatron_kwargs: what this megatron-core release's TransformerLayer passes on (from 0.17: is_mtp_layer;
        # from 0.18: name), handed to MoELayer unchanged.
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         **megatron_kwargs)
        if token_dispatcher_builder is not None:
            self.token_dispatcher = token_dispatcher_builder(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection if pg_collection is not None else self._pg_collection_fallback(),
            )
        self.use_fixed_route = moe_config.side(side).mode == "task"
        """Task routing: a micro-batch of one task row takes one route, which `forward` runs directly at inference."""
        self.adapters = None
        if moe_config.adapters.enabled:
            shared = None
            if moe_config.adapters.mode == "shared_dynamic":
                router = self.router
                shared = router.task_table  # bound method: the router keeps ownership of the table
            self.adapters = TaskAdapters(
                config, moe_config=moe_config, side=side, task_context=task_context, shared_task_table=shared
            )

    @staticmethod
    def _pg_collection_fallback():
        return get_default_pg_collection()

    def _holds_every_expert(self) -> bool:
        """Whether this rank holds every expert whole (no expert or expert-tensor parallelism, megatron's
        per-expert MLPs, no shared experts), so that a fixed route needs no communication."""
        if (self.num_local_experts != self.config.num_moe_experts or self.use_shared_expert
                or not isinstance(self.experts, SequentialMLP)):
            return False
        width = self.config.moe_ffn_hidden_size * (2 if self.config.gated_linear_unit else 1)
        return all(expert.linear_fc1.weight.shape[0] == width for expert in self.experts.local_experts)

    def _fixed_route_forward(self, hidden_states_LBD: torch.Tensor, experts: list[int], probs_K: torch.Tensor):
        """Every token through the same experts: what route -> permute -> experts -> unpermute compute when all
        tokens take one route, with the same operations (each expert on all T tokens with its weight as the
        per-token scale, the K outputs summed in expert order with fp32 accumulation, as our unpermute), without
        the per-token routing, the permutation and megatron's dispatch."""
        x_TD = hidden_states_LBD.reshape(-1, hidden_states_LBD.shape[-1])
        num_tokens = x_TD.shape[0]
        out_TD = None
        for k, e in enumerate(experts):
            y_TD, bias = self.experts.local_experts[e](x_TD, probs_K[k].expand(num_tokens))
            assert bias is None, "experts fold their bias into the output when given a per-token scale"
            y_TD = y_TD.float()
            out_TD = y_TD if out_TD is None else out_TD + y_TD
        return out_TD.to(hidden_states_LBD.dtype).view_as(hidden_states_LBD), None

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if intermediate_tensors is not None:
            raise ValueError("TaskMoEMLP: partial (CUDA-graph) execution of the MoE layer is not supported")
        route = None
        if not self.training and self.use_fixed_route and self._holds_every_expert():
            route = self.router.fixed_route()
        if route is not None:
            output, bias = self._fixed_route_forward(hidden_states, *route)
        else:
            output, bias = super().forward(hidden_states, padding_mask=padding_mask)
        if self.adapters is not None:
            local_len, batch = output.shape[:2]
            mask = None if padding_mask is None else padding_mask.transpose(0, 1)
            mask_LB = self.router._local_padding_mask(mask, local_len, batch)
            output = self.adapters(output, mask_LB)
        return output, bias


def get_moe_mlp_spec(
    moe_config: MoEConfig,
    side: str,
    task_context: TaskContext | None,
    *,
    token_dispatcher_builder: DispatcherBuilder | None = None,
) -> ModuleSpec:
    """The complete spec for an MoE layer's `mlp` slot on `side` ("encoder" or "decoder").

    Plain megatron `MoELayer` when no adapters and no custom dispatcher are configured and the side does not route
    by task (so `TransformerLayer` hands it its `pg_collection`); `TaskMoEMLP` otherwise (it falls back to
    megatron's default process groups, i.e. the ones `initialize_model_parallel` set up)."""
    routing = moe_config.side(side)
    if routing.layer_freq == 0:
        raise ValueError(f"get_moe_mlp_spec: MoEConfig.{side}.layer_freq=0 means the {side} has no MoE layers")
    if (routing.uses_task_ids or moe_config.adapters.enabled) and task_context is None:
        raise ValueError(f"get_moe_mlp_spec: {side} routing {routing.mode!r} / adapters need the model's TaskContext")
    router = functools.partial(TaskTopKRouter, moe_config=moe_config, side=side, task_context=task_context)
    experts = ModuleSpec(
        module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )
    submodules = MoESubmodules(experts=experts, router=router)
    if not moe_config.adapters.enabled and token_dispatcher_builder is None and routing.mode != "task":
        return ModuleSpec(module=MoELayer, submodules=submodules, metainfo={"fuse_pre_mlp_layernorm": False})
    return ModuleSpec(
        module=TaskMoEMLP,
        submodules=submodules,
        params=dict(
            moe_config=moe_config,
            side=side,
            task_context=task_context,
            token_dispatcher_builder=token_dispatcher_builder,
        ),
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


# ------------------------------------------------------------------------------------------ statistics


def _stat_modules(model: torch.nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, (TaskTopKRouter, TaskAdapters)):
            yield name, module


def set_routing_stats(model: torch.nn.Module, enabled: bool = True) -> None:
    """Turn statistics collection on/off for every router and adapter block of `model` (zeroed when enabled, so
    every rank holds tensors of the same shapes for `all_reduce_routing_stats`)."""
    for _, module in _stat_modules(model):
        module.collect_stats = enabled
        if enabled:
            device = next(module.parameters()).device
            module.init_stats(device)


def pause_routing_stats(model: torch.nn.Module, paused: bool = True) -> None:
    """Stop (or resume) counting without clearing what was counted, e.g. while decoding during validation."""
    for _, module in _stat_modules(model):
        module.collect_stats = not paused


def reset_routing_stats(model: torch.nn.Module) -> None:
    for _, module in _stat_modules(model):
        if module.collect_stats:
            module.init_stats(next(module.parameters()).device)
        else:
            module.reset_stats()


def routing_stats(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {...}}: routers give "expert_assignments" [G, E] (real tokens of task g kept by expert e,
    counting every one of a token's top-k) and "tokens" [G]; adapter blocks give "adapter_assignments" [G, A] and
    "tokens" [G]. Only modules that collected something are listed."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in _stat_modules(model):
        if isinstance(module, TaskTopKRouter) and module.stats_assignments_GE is not None:
            out[name] = {"expert_assignments": module.stats_assignments_GE, "tokens": module.stats_tokens_G}
        elif isinstance(module, TaskAdapters) and module.stats_assignments_GA is not None:
            out[name] = {"adapter_assignments": module.stats_assignments_GA, "tokens": module.stats_tokens_G}
    return out


def pack_routing_stats(stats: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list]:
    """All statistics in one flat buffer (sorted by module name, then key: the same order on every rank holding
    the same layers) and its layout [(name, key, shape)]; `unpack_routing_stats` inverts it."""
    layout = [(name, key, tuple(stats[name][key].shape)) for name in sorted(stats) for key in sorted(stats[name])]
    if not layout:
        return torch.zeros(0, dtype=torch.float64), layout
    return torch.cat([stats[name][key].reshape(-1) for name, key, _ in layout]), layout


def unpack_routing_stats(flat, layout: list) -> dict[str, dict]:
    """{name: {key: piece of `flat` (a tensor or a numpy array) in its shape}}."""
    out: dict[str, dict] = {}
    offset = 0
    for name, key, shape in layout:
        size = 1
        for dim in shape:
            size *= dim
        out.setdefault(name, {})[key] = flat[offset : offset + size].reshape(shape)
        offset += size
    return out


def all_reduce_routing_stats(stats: dict[str, dict[str, torch.Tensor]], group=None) -> dict:
    """Sum every statistic over `group` in place, with one collective on the packed buffer."""
    if not (dist.is_available() and dist.is_initialized()) or not stats:
        return stats
    flat, layout = pack_routing_stats(stats)
    dist.all_reduce(flat, group=group)
    for name, entry in unpack_routing_stats(flat, layout).items():
        for key, part in entry.items():
            stats[name][key].copy_(part)
    return stats


# ------------------------------------------------------------------------------------------ training telemetry


def _telemetry_modules(model: torch.nn.Module):
    """Routers, and adapter blocks with a gate (static adapters are one per task by construction)."""
    for name, module in _stat_modules(model):
        if isinstance(module, TaskTopKRouter) or module.adapter_config.is_dynamic:
            yield name, module


def set_routing_telemetry(model: torch.nn.Module, enabled: bool = True) -> int:
    """Give every router and dynamic adapter block of `model` zeroed training counters (`routing_counts.py`), or
    remove them; returns how many modules count."""
    count = 0
    for _, module in _telemetry_modules(model):
        if enabled:
            module.init_telemetry(next(module.parameters()).device)
            count += 1
        else:
            module.telemetry = None
    return count


def routing_telemetry(model: torch.nn.Module) -> dict[str, dict]:
    """{module name: {"kind": "experts" | "adapters", "mode": routing or adapter mode, "topk", "counts": {key:
    tensor}}} for every module counting telemetry, in module order (encoder layers first). The tensors are the
    live counters: `pack_routing_stats` copies them into one buffer to reduce, `zero_routing_telemetry` restarts
    them."""
    out = {}
    for name, module in _telemetry_modules(model):
        if module.telemetry is None:
            continue
        kind = module.telemetry.kind
        out[name] = {"kind": kind, "mode": module.mode, "topk": module.topk, "counts": module.telemetry.values}
    return out


def zero_routing_telemetry(model: torch.nn.Module) -> None:
    for _, module in _telemetry_modules(model):
        if module.telemetry is not None:
            module.telemetry.zero_()
