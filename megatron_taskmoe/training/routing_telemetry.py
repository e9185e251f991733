"""Routing telemetry while training: every log interval a `routing` record in `metrics.jsonl`, scalars and
histograms in TensorBoard, and a warning when an MoE layer or an adapter gate collapses.

Counting happens in the model (`model/routing_counts.py`): each router and dynamic adapter block adds every
training micro-batch to on-device float64 counters, with no host synchronisation. `RoutingTelemetry.log`, called by
the trainer at each log step, reads them once:

  * Which ranks share a layer's tokens. Routers and adapter gates are replicated and each rank of a pipeline stage
    routes only its own tokens: data-parallel ranks their micro-batches, tensor-parallel ranks their S/TP positions
    of every sequence (sequence parallelism, always on with MoE layers and TP > 1). Expert-parallel ranks are some
    of those same tensor x data ranks (megatron carves the expert groups out of them) and the counts are taken at
    the router, before the tokens are dispatched to the experts' ranks, so expert parallelism neither splits nor
    duplicates them. One sum over the stage's tensor x data group (`pg_collection.tp_dp_cp`; the data-parallel
    group alone if tensor ranks were to route the same tokens, without sequence parallelism) therefore gives the
    global counts of every layer of the stage.
  * Pipeline stages hold different layers: the summed counts are gathered over the pipeline group, named as in the
    whole model.

So a log step costs one all-reduce of one packed buffer, one device-to-host copy and, with pipelining, one object
gather; the statistics (`analysis/telemetry.py`) are computed on the host of the logging rank. The counters are then
zeroed: a record covers the steps since the previous one (`window_steps`).
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_taskmoe.analysis.telemetry import collapse_changes, routing_record
from megatron_taskmoe.model.moe import (pack_routing_stats, routing_telemetry, set_routing_telemetry,
                                        unpack_routing_stats, zero_routing_telemetry)

log = logging.getLogger(__name__)


def _tag(label: str) -> str:
    """A TensorBoard tag piece from a layer label ("encoder layer 2 experts" -> "encoder_layer_2_experts")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def tensorboard_items(record: dict, layers: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(scalars, histograms) of a routing record: the summary numbers and, per layer, its load ratio, drops, empty
    experts, entropy and each task's entropy as scalars; its load and each task's load over the experts (or
    adapters) as histograms. `layers` are the record's reduced counts."""
    scalars = {f"routing/{k}": record[k] for k in ("load_ratio_p50", "load_ratio_p95", "load_ratio_max",
                                                   "dropped_fraction", "empty_experts") if record[k] is not None}
    histograms = {}
    for name, entry in record["layers"].items():
        tag = f"routing/{_tag(entry['label'])}"
        for key in ("load_ratio", "demand_load_ratio", "dropped_fraction", "empty_experts", "entropy"):
            if entry.get(key) is not None:
                scalars[f"{tag}/{key}"] = entry[key]
        for task, h in entry["task_entropy"].items():
            if h is not None:
                scalars[f"{tag}/task_entropy/{task}"] = h
        counts = layers[name]["counts"]
        assigned_GX = counts["task_assigned_GE" if entry["kind"] == "experts" else "task_assigned_GA"]
        load_X = counts["assigned_E"] if entry["kind"] == "experts" else assigned_GX.sum(axis=0)
        histograms[f"{tag}/load"] = [float(v) for v in load_X]
        tasks = record["tasks"]
        for g, row in enumerate(assigned_GX):
            if row.sum() > 0 and g < len(tasks):
                histograms[f"{tag}/task/{tasks[g]}"] = [float(v) for v in row]
    return scalars, histograms


class RoutingTelemetry:
    """The trainer's side of the telemetry (module docstring); every rank constructs it and calls `log` at the
    same steps (it is collective)."""

    def __init__(self, module: torch.nn.Module, pg_collection, *, task_names: Sequence[str], enabled: bool = True,
                 collapse_share: float = 0.9, logging_rank: bool = True, start_step: int = 0):
        """`module`: this rank's model (or pipeline stage), unwrapped; `enabled` must be the same on every rank
        (the config switch, and whether the model has MoE layers at all)."""
        if not 0 < collapse_share <= 1:
            raise ValueError(f"RoutingTelemetry: collapse_share={collapse_share} must be in (0, 1]")
        self.module = module
        self.pg_collection = pg_collection
        self.task_names = list(task_names)
        self.collapse_share = collapse_share
        self.logging_rank = logging_rank
        self.enabled = enabled
        self.last_step = start_step
        self.collapsed: set[str] = set()
        set_routing_telemetry(module, enabled)

    def _sum_group(self):
        pg = self.pg_collection
        sequence_parallel = bool(getattr(self.module.config, "sequence_parallel", False))
        return pg.tp_dp_cp if pg.tp.size() == 1 or sequence_parallel else pg.dp

    def _whole_name(self, name: str) -> str:
        whole = getattr(self.module, "whole_model_name", None)
        return name if whole is None else whole(name)

    def reduce(self) -> dict[str, dict]:
        """{whole-model module name: {"kind", "mode", "topk", "counts": {key: numpy array}}} summed over the
        window and every rank (collective), in model order; zeroes the counters."""
        layers = routing_telemetry(self.module)
        flat, layout = pack_routing_stats({name: info["counts"] for name, info in layers.items()})
        group = self._sum_group()
        if layout and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        host = unpack_routing_stats(flat.cpu().numpy().copy(), layout)
        zero_routing_telemetry(self.module)
        local = {self._whole_name(name): {"kind": info["kind"], "mode": info["mode"], "topk": info["topk"],
                                          "counts": host[name]} for name, info in layers.items()}
        pp = self.pg_collection.pp
        if pp.size() == 1:
            return local
        gathered: list = [None] * pp.size()
        dist.all_gather_object(gathered, local, group=pp)
        return {name: entry for stage in gathered for name, entry in stage.items()}

    def record(self, step: int) -> tuple[Optional[dict], dict]:
        """(the routing record for the window ending at `step` or None when nothing counted, the reduced counts);
        collective. The record is made on every rank."""
        layers = self.reduce()
        window, self.last_step = step - self.last_step, step
        if not layers:
            return None, layers
        return routing_record(layers, self.task_names, window_steps=window, collapse_share=self.collapse_share), \
            layers

    def log(self, step: int, writer) -> Optional[dict]:
        """Reduce, write the record to `writer` (a `MetricsWriter`, which writes on the logging rank only), warn
        about layers that collapsed since the last record; returns the record. Collective; no-op when disabled."""
        if not self.enabled:
            return None
        record, layers = self.record(step)
        if record is None:
            return None
        record["warnings"] = self._warnings(record, step)
        if self.logging_rank:
            scalars, histograms = tensorboard_items(record, layers)
            writer.write("routing", step, tb_scalars=scalars, tb_histograms=histograms, **record)
        return record

    def _warnings(self, record: dict, step: int) -> list[str]:
        """Warnings (logged on the logging rank) for layers that collapsed since the previous record; a layer that
        recovers is logged once at info level."""
        warnings, recovered = collapse_changes(record, self.collapsed, step)
        if self.logging_rank:
            for text in warnings:
                log.warning(text)
            for name in recovered:
                log.info("routing at step %d: %s (%s) no longer collapsed", step, record["layers"][name]["label"],
                         name)
        self.collapsed = set(record["collapsed"])
        return warnings


def has_routing(model_config) -> bool:
    """Whether a model has anything to count (MoE layers)."""
    return model_config.moe is not None and model_config.num_moe_layers() > 0

