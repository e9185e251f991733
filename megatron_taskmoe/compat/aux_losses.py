"""The MoE aux-loss tracker of every supported megatron-core release, behind one set of functions.

A dict of dicts in `moe_utils` up to 0.17 (`get_moe_layer_wise_logging_tracker`, `save_to_aux_losses_tracker`,
...); from 0.18 a `MoEMetricsTracker` (`moe_logging.get_moe_metrics_tracker()`) whose old functions are deprecated
wrappers that return a *copy* of the entries. `record_aux_loss`, `aux_loss_entries`, `set_aux_loss_entries`,
`reduce_aux_losses`, `clear_aux_losses` and `reset_aux_losses` use the tracker this release has, with one meaning
everywhere: an entry is summed over the pipeline group and its reduce group, averaged over its average group, and
averaged over data parallelism when `needs_dp_avg` (0.16.1's rule: entries with a reduce group that does not span
the data-parallel ranks).

megatron-core is imported inside the functions: which module exists depends on the release.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.transformer.moe import moe_utils


@dataclass(kw_only=True)
class AuxLossEntry:
    """One tracked aux loss: a value per layer and how it is reduced over ranks."""

    values: torch.Tensor
    """[num_layers] sums of what each layer recorded (the tracker's own tensor, not a copy)."""
    reduce_group: Any = None
    """Process group the values are summed over (e.g. the tensor-parallel ranks sharing a sequence), or None."""
    avg_group: Any = None
    """Process group the values are averaged over, or None."""
    needs_dp_avg: bool = False
    """Whether the values are averaged over the data-parallel ranks after the other reductions."""


@functools.lru_cache(maxsize=None)
def _moe_logging_module():
    """megatron's `moe_logging` module (0.18 and later), else None (looked up once: the router logs often)."""
    try:
        return importlib.import_module("megatron.core.transformer.moe.moe_logging")
    except ImportError:
        return None


def _metrics_tracker():
    """megatron's `MoEMetricsTracker` (0.18 and later), else None."""
    module = _moe_logging_module()
    return None if module is None else module.get_moe_metrics_tracker()


def _legacy_tracker() -> dict:
    return moe_utils.get_moe_layer_wise_logging_tracker()


def record_aux_loss(name: str, value: torch.Tensor, layer_number: Optional[int], num_layers: int,
                    reduce_group=None) -> None:
    """Add `value` to aux loss `name` of layer `layer_number` (1-based; None records nothing).

    `reduce_group` (e.g. the tensor-parallel group under sequence parallelism, where `value` is this rank's
    share) is summed over when reducing; such an entry is then averaged over data parallelism (as megatron-core
    0.16.1 does), an entry without one is not."""
    if layer_number is None:
        return
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.record(name, value, layer_number, num_layers, reduce_group=reduce_group,
                       needs_dp_avg=reduce_group is not None)
        return

    moe_utils.save_to_aux_losses_tracker(name, value, layer_number, num_layers, reduce_group=reduce_group)


def aux_loss_entries() -> dict[str, AuxLossEntry]:
    """The tracked aux losses by name, in the tracker's order (their `values` are the tracker's tensors)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        return {name: AuxLossEntry(values=e.values, reduce_group=e.reduce_group, avg_group=e.avg_group,
                                   needs_dp_avg=e.needs_dp_avg) for name, e in tracker.metrics.items()}
    return {name: AuxLossEntry(values=e["values"], reduce_group=e.get("reduce_group"), avg_group=e.get("avg_group"),
                               needs_dp_avg=e.get("reduce_group") is not None and not e.get("reduce_group_has_dp"))
            for name, e in _legacy_tracker().items()}


def set_aux_loss_entries(entries: dict[str, AuxLossEntry]) -> None:
    """Replace the tracked aux losses by `entries`, in their order."""
    tracker = _metrics_tracker()
    if tracker is not None:
        from megatron.core.transformer.moe.moe_logging import MetricEntry  # megatron-core >= 0.18 only

        tracker.metrics.clear()
        for name, e in entries.items():
            tracker.metrics[name] = MetricEntry(values=e.values, reduce_group=e.reduce_group, avg_group=e.avg_group,
                                                needs_dp_avg=e.needs_dp_avg)
        return
    for entry in entries.values():
        if entry.needs_dp_avg and entry.reduce_group is None:
            raise ValueError("set_aux_loss_entries: megatron-core < 0.18 averages over data parallelism only "
                             "entries that have a reduce group")
    legacy = _legacy_tracker()
    legacy.clear()
    for name, e in entries.items():
        legacy[name] = {"values": e.values, "reduce_group": e.reduce_group, "avg_group": e.avg_group,
                        "reduce_group_has_dp": not e.needs_dp_avg}


def reduce_aux_losses(pg_collection=None) -> None:
    """Reduce every tracked aux loss over the ranks, in place (megatron's own reduction of this release)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker._sync_metrics(list(tracker.metrics), pg_collection)
        return

    moe_utils.reduce_aux_losses_tracker_across_ranks(pg_collection=pg_collection)


def clear_aux_losses() -> None:
    """Zero every tracked aux loss (the entries and their sizes stay)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.clear()
        return
    for entry in _legacy_tracker().values():
        entry["values"].zero_()


def reset_aux_losses() -> None:
    """Forget every tracked aux loss (the next record sizes its entry afresh)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.metrics.clear()
        return
    _legacy_tracker().clear()

