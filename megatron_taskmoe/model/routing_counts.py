"""Counting what routers and adapter gates decide, on the device, without synchronising with the host.

Two consumers share these counts:
  * validation and `analysis.collect_routing_stats` (eval mode): per task, the real tokens each expert or adapter
    received (`add_task_counts_` into a module's `stats_*` tensors, switched on by `moe.set_routing_stats`);
  * training telemetry (`training/routing_telemetry.py`): a `RoutingCounters` per router and per dynamic adapter
    block, switched on by `moe.set_routing_telemetry`, summed over every training micro-batch until the trainer
    reads, reduces and zeroes them once per log interval.

Every function here only launches tensor operations: no `.item()`, `.tolist()`, `int(tensor)` or data-dependent
Python branch, so on a GPU counting never waits for the device (`tests/gpu/test_routing_counts_gpu.py` checks this
with torch's sync debug mode). Padding tokens are never counted. Counts are float64: exact integers far beyond any
run's token count, and sums that do not depend on the order ranks are added in.

Legend: T tokens, E experts, A adapters, X either, G task rows.
"""

from __future__ import annotations

import torch

ROUTER_KEYS = ("assigned_E", "routed_E", "tokens", "dropped_tokens", "entropy_sum", "task_assigned_GE",
               "task_tokens_G")
ADAPTER_KEYS = ("task_assigned_GA", "task_tokens_G")


def _weights(num_tokens: int, valid_T: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """1.0 at real tokens, 0.0 at padding, float64 [T]."""
    if valid_T is None:
        return torch.ones(num_tokens, dtype=torch.float64, device=device)
    return valid_T.reshape(-1).to(torch.float64)


def add_task_counts_(
    counts_GX: torch.Tensor,
    tokens_G: torch.Tensor,
    ids_T: torch.Tensor,
    map_TX: torch.Tensor,
    valid_T: torch.Tensor | None = None,
) -> None:
    """In place: counts_GX[g, x] += real tokens of task g sent to x (each of a token's top-k counts once);
    tokens_G[g] += real tokens of task g."""
    weight_T = _weights(map_TX.shape[0], valid_T, map_TX.device).to(counts_GX.dtype)
    counts_GX.index_add_(0, ids_T, map_TX.to(counts_GX.dtype) * weight_T.unsqueeze(-1))
    tokens_G.index_add_(0, ids_T, weight_T.to(tokens_G.dtype))


def router_entropy_T(logits_TE: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's routing distribution softmax(logits) over all experts, fp32 [T]."""
    logp_TE = torch.log_softmax(logits_TE.detach().float(), dim=-1)
    return -(logp_TE.exp() * logp_TE).sum(dim=-1)


def router_counts(
    logits_TE: torch.Tensor,
    routed_TE: torch.Tensor,
    kept_TE: torch.Tensor,
    valid_T: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One micro-batch of a router, real tokens only: "assigned_E" (assignments each expert received after
    capacity dropping), "routed_E" (before dropping), "tokens", "dropped_tokens" (tokens left with no expert by
    dropping) and "entropy_sum" (summed per-token router entropy), all float64. `routed_TE` and `kept_TE` are
    the boolean routing maps before and after dropping (the same tensor when dropless); a kept entry that was
    not routed (padding to capacity) is not an assignment."""
    dropless = kept_TE is routed_TE
    weight_1T = _weights(routed_TE.shape[0], valid_T, routed_TE.device).unsqueeze(0)
    routed_TE = routed_TE.bool()
    routed_E = (weight_1T @ routed_TE.to(torch.float64)).reshape(-1)
    if dropless:
        assigned_E, dropped = routed_E, weight_1T.new_zeros(1)
    else:
        kept_TE = kept_TE.bool() & routed_TE
        assigned_E = (weight_1T @ kept_TE.to(torch.float64)).reshape(-1)
        dropped = (weight_1T @ (~kept_TE.any(dim=-1)).to(torch.float64).unsqueeze(-1)).reshape(1)
    entropy = (weight_1T @ router_entropy_T(logits_TE).to(torch.float64).unsqueeze(-1)).reshape(1)
    return {"assigned_E": assigned_E, "routed_E": routed_E, "tokens": weight_1T.sum().reshape(1),
            "dropped_tokens": dropped, "entropy_sum": entropy}


class RoutingCounters:
    """Running float64 sums of one router's or adapter block's routing in training (see the module docstring).

    `values` maps each key of `ROUTER_KEYS` (routers) or `ADAPTER_KEYS` (adapter blocks) to a tensor on the
    module's device; the shapes depend only on the model, so every rank holding the layer packs the same
    layout."""

    def __init__(self, kind: str, *, num_choices: int, num_task_rows: int, device: torch.device) -> None:
        if kind not in ("experts", "adapters"):
            raise ValueError(f"RoutingCounters: kind={kind!r} must be 'experts' or 'adapters'")
        self.kind = kind
        if kind == "experts":
            shapes = {"assigned_E": (num_choices,), "routed_E": (num_choices,), "tokens": (1,),
                      "dropped_tokens": (1,), "entropy_sum": (1,), "task_assigned_GE": (num_task_rows, num_choices),
                      "task_tokens_G": (num_task_rows,)}
        else:
            shapes = {"task_assigned_GA": (num_task_rows, num_choices), "task_tokens_G": (num_task_rows,)}
        self.values = {k: torch.zeros(shape, dtype=torch.float64, device=device) for k, shape in shapes.items()}

    def add_router(self, logits_TE, routed_TE, kept_TE, valid_T, ids_T: torch.Tensor | None) -> None:
        """Count one micro-batch of the router (`ids_T`: the tokens' task ids, None when the batch has none)."""
        for key, value in router_counts(logits_TE, routed_TE, kept_TE, valid_T).items():
            self.values[key].add_(value)
        if ids_T is not None:
            kept = kept_TE if kept_TE is routed_TE else kept_TE.bool() & routed_TE.bool()
            add_task_counts_(self.values["task_assigned_GE"], self.values["task_tokens_G"], ids_T, kept, valid_T)

    def add_adapters(self, map_TA: torch.Tensor, valid_T: torch.Tensor | None, ids_T: torch.Tensor) -> None:
        """Count one micro-batch of the adapter gate's choices."""
        add_task_counts_(self.values["task_assigned_GA"], self.values["task_tokens_G"], ids_T, map_TA, valid_T)

    def zero_(self) -> None:
        for value in self.values.values():
            value.zero_()
