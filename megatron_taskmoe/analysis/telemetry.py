"""Routing telemetry: the statistics of a `routing` record of `metrics.jsonl`, as pure functions, and reading
records back.

The trainer (`training/routing_telemetry.py`) sums each MoE layer's counts over a log interval's micro-batches and
the ranks, then `routing_record` turns them into one JSON-able record:

    {"window_steps", "tasks", "load_ratio_p50", "load_ratio_p95", "load_ratio_max", "dropped_fraction",
     "empty_experts", "collapsed": [layer names], "layers": {module name: entry}}

An entry of a router ("kind": "experts") holds `tokens` (real tokens routed), `share` (each expert's share of the
assignments it received, after capacity dropping; a token counts once per chosen expert), `load_ratio` (max/mean
of those loads: 1 is perfect balance, E means one expert took everything), `demand_load_ratio` (the same before
dropping: what the router asked for), `dropped_fraction` (assignments dropped by capacity / assignments routed),
`dropped_tokens_fraction` (tokens left with no expert), `empty_experts` (experts that received nothing),
`entropy` (mean over tokens of the entropy, in nats, of the router's softmax over all experts; log E is uniform),
and per task seen in the window `task_tokens`, `task_share` (the task's expert distribution) and `task_entropy`
(its entropy in nats: 0 when a task uses one expert). A dynamic adapter block ("kind": "adapters") holds `tokens`,
`share` per adapter and the same per-task fields. `collapsed` says whether the layer collapsed (`expert_collapse`,
`adapter_collapse`; `collapse_changes` gives the warnings for layers that newly did). p50/p95 are over the layers'
`load_ratio` (numpy's linear interpolation).

`read_routing_records(path)` reads them back (with the file and line of a bad one) and `record_routing_stats`
makes a record's per-task distributions an `analysis.RoutingStats`, so `similarity.py` applies as to a checkpoint's.

Legend: E experts, A adapters, X either, G task rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from megatron_taskmoe.analysis.routing import LayerRouting, RoutingStats, layer_label

DIGITS = 6
"""Decimal places shares, ratios and entropies are rounded to in the record."""


def _num(value, digits: int = DIGITS) -> Optional[float]:
    value = float(value)
    return None if not math.isfinite(value) else round(value, digits)


# ------------------------------------------------------------------------------------------------ statistics
def shares(counts_X: np.ndarray) -> np.ndarray:
    """Counts as shares summing to 1 (all zeros when nothing was counted)."""
    counts_X = np.asarray(counts_X, dtype=np.float64)
    total = counts_X.sum()
    return counts_X / total if total > 0 else np.zeros_like(counts_X)


def load_ratio(counts_E: np.ndarray) -> Optional[float]:
    """max / mean of the experts' loads (1 = balanced, E = one expert took all); None when nothing was routed."""
    counts_E = np.asarray(counts_E, dtype=np.float64)
    mean = counts_E.mean() if counts_E.size else 0.0
    return float(counts_E.max() / mean) if mean > 0 else None


def entropy(dist_X: np.ndarray) -> Optional[float]:
    """Entropy in nats of a distribution given as counts or shares (0 log 0 = 0); None when it is empty."""
    p_X = shares(dist_X)
    if not p_X.any():
        return None
    nz = p_X[p_X > 0]
    return float(-(nz * np.log(nz)).sum()) + 0.0  # + 0.0: one expert gives 0.0, not -0.0


def empty_count(counts_X: np.ndarray) -> int:
    """How many experts (adapters) received nothing."""
    return int((np.asarray(counts_X) <= 0).sum())


def dropped_fraction(kept: float, routed: float) -> Optional[float]:
    """Share of the routed assignments that capacity dropped; None when nothing was routed."""
    return float((routed - kept) / routed) if routed > 0 else None


def percentiles(values: Sequence[Optional[float]], qs: Sequence[float] = (50, 95)) -> list[Optional[float]]:
    """Percentiles of the values that exist (numpy's linear interpolation); None each when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return [None] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), list(qs))]


def expert_collapse(routed_E: np.ndarray, tokens: float, topk: int, threshold: float) -> Optional[tuple[int, float]]:
    """(expert, fraction) when one expert is chosen by at least `threshold` of the layer's tokens, else None.
    Judged on the router's choices before capacity dropping (dropping would hide it); never with topk >= E, where
    every expert takes every token by construction."""
    routed_E = np.asarray(routed_E, dtype=np.float64)
    if tokens <= 0 or topk >= routed_E.size:
        return None
    frac_E = routed_E / tokens
    e = int(frac_E.argmax())
    return (e, float(frac_E[e])) if frac_E[e] >= threshold else None


def adapter_collapse(task_assigned_GA: np.ndarray, task_tokens_G: np.ndarray, topk: int,
                     threshold: float) -> Optional[tuple[int, float]]:
    """(adapter, smallest task fraction) when the gate sends every task seen (at least two) to one adapter: each
    task's tokens choose that adapter with at least `threshold` of their choices; else None."""
    task_assigned_GA = np.asarray(task_assigned_GA, dtype=np.float64)
    task_tokens_G = np.asarray(task_tokens_G, dtype=np.float64)
    seen = task_tokens_G > 0
    if seen.sum() < 2 or topk >= task_assigned_GA.shape[1]:
        return None
    frac_GA = task_assigned_GA[seen] / task_tokens_G[seen, None]
    floor_A = frac_GA.min(axis=0)
    a = int(floor_A.argmax())
    return (a, float(floor_A[a])) if floor_A[a] >= threshold else None


# ------------------------------------------------------------------------------------------------ the record
def _per_task(assigned_GX: np.ndarray, tokens_G: np.ndarray, tasks: Sequence[str]) -> dict:
    out = {"task_tokens": {}, "task_share": {}, "task_entropy": {}}
    for g, count in enumerate(np.asarray(tokens_G, dtype=np.float64)):
        if count <= 0:
            continue
        name = tasks[g] if g < len(tasks) else str(g)
        out["task_tokens"][name] = int(round(count))
        out["task_share"][name] = [_num(v) for v in shares(assigned_GX[g])]
        h = entropy(assigned_GX[g])  # None when every assignment of the task was dropped
        out["task_entropy"][name] = None if h is None else _num(h)
    return out


def layer_entry(name: str, kind: str, mode: str, topk: int, counts: Mapping[str, np.ndarray],
                tasks: Sequence[str], collapse_share: float) -> dict:
    """One layer's entry of the record from its reduced counts (`model/routing_counts.py` keys)."""
    c = {k: np.asarray(v, dtype=np.float64) for k, v in counts.items()}
    if kind == "experts":
        tokens = float(c["tokens"].sum())
        kept, routed = float(c["assigned_E"].sum()), float(c["routed_E"].sum())
        collapse = expert_collapse(c["routed_E"], tokens, topk, collapse_share)
        entry = {"kind": kind, "label": layer_label(name, kind), "mode": mode, "topk": topk,
                 "tokens": int(round(tokens)),
                 "share": [_num(v) for v in shares(c["assigned_E"])],
                 "load_ratio": _num(load_ratio(c["assigned_E"]) or math.nan),
                 "demand_load_ratio": _num(load_ratio(c["routed_E"]) or math.nan),
                 "dropped_fraction": _num(dropped_fraction(kept, routed) if routed > 0 else math.nan),
                 "dropped_tokens_fraction": _num(float(c["dropped_tokens"].sum()) / tokens if tokens else math.nan),
                 "empty_experts": empty_count(c["assigned_E"]),
                 "entropy": _num(float(c["entropy_sum"].sum()) / tokens if tokens else math.nan),
                 **_per_task(c["task_assigned_GE"], c["task_tokens_G"], tasks)}
    elif kind == "adapters":
        assigned_GA, tokens_G = c["task_assigned_GA"], c["task_tokens_G"]
        collapse = adapter_collapse(assigned_GA, tokens_G, topk, collapse_share)
        entry = {"kind": kind, "label": layer_label(name, kind), "mode": mode, "topk": topk,
                 "tokens": int(round(float(tokens_G.sum()))),
                 "share": [_num(v) for v in shares(assigned_GA.sum(axis=0))],
                 **_per_task(assigned_GA, tokens_G, tasks)}
    else:
        raise ValueError(f"layer_entry: {name}: kind {kind!r} is not 'experts' or 'adapters'")
    entry["collapsed"] = collapse is not None
    if collapse is not None:
        entry["collapse"] = {"choice": collapse[0], "fraction": _num(collapse[1])}
    return entry


def routing_record(layers: Mapping[str, Mapping], tasks: Sequence[str], *, window_steps: int,
                   collapse_share: float = 0.9) -> dict:
    """The `routing` record (module docstring) of `layers` = {module name: {"kind", "mode", "topk", "counts"}},
    whose counts are already summed over the window's micro-batches and all ranks."""
    if not 0 < collapse_share <= 1:
        raise ValueError(f"routing_record: collapse_share={collapse_share} must be in (0, 1]")
    entries = {name: layer_entry(name, info["kind"], info["mode"], info["topk"], info["counts"], tasks,
                                 collapse_share) for name, info in layers.items()}
    experts = {name: e for name, e in entries.items() if e["kind"] == "experts"}
    ratios = [e["load_ratio"] for e in experts.values()]
    p50, p95 = percentiles(ratios)
    existing = [r for r in ratios if r is not None]
    routed = sum(float(np.sum(layers[n]["counts"]["routed_E"])) for n in experts)
    kept = sum(float(np.sum(layers[n]["counts"]["assigned_E"])) for n in experts)
    return {"window_steps": int(window_steps), "tasks": list(tasks),
            "load_ratio_p50": _num(p50) if p50 is not None else None,
            "load_ratio_p95": _num(p95) if p95 is not None else None,
            "load_ratio_max": _num(max(existing)) if existing else None,
            "dropped_fraction": _num(dropped_fraction(kept, routed)) if routed > 0 else None,
            "empty_experts": sum(e["empty_experts"] for e in experts.values()),
            "collapsed": [name for name, e in entries.items() if e["collapsed"]],
            "layers": entries}


def collapse_message(name: str, entry: Mapping, step: int) -> str:
    """The warning for a collapsed layer, naming it."""
    choice, fraction = entry["collapse"]["choice"], entry["collapse"]["fraction"]
    if entry["kind"] == "experts":
        return (f"routing collapse at step {step}: {entry['label']} ({name}) sends {fraction:.0%} of its tokens to "
                f"expert {choice} of {len(entry['share'])}")
    return (f"routing collapse at step {step}: {entry['label']} ({name}): the adapter gate sends every task to "
            f"adapter {choice} of {len(entry['share'])} (at least {fraction:.0%} of each task's tokens)")


def collapse_changes(record: Mapping, previously: set[str], step: int) -> tuple[list[str], list[str]]:
    """(warnings for the layers of `record` that collapsed and were not collapsed in the previous record, names of
    the layers that were and no longer are)."""
    now = record["collapsed"]
    warnings = [collapse_message(name, record["layers"][name], step) for name in now if name not in previously]
    recovered = [name for name in sorted(previously) if name not in now and name in record["layers"]]
    return warnings, recovered


# ------------------------------------------------------------------------------------------------ reading back
class TelemetryError(ValueError):
    """A metrics file that cannot be read as routing telemetry; the message names the file (and line)."""


def read_routing_records(path: str | Path) -> list[dict]:
    """The `routing` records of a `metrics.jsonl`, in order; TelemetryError naming the file and line of a line that
    is not JSON or a routing record without layers."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TelemetryError(f"{path}: {e}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise TelemetryError(f"{path}:{number}: not a JSON line ({e})") from None
        if not isinstance(record, dict) or record.get("kind") != "routing":
            continue
        if not isinstance(record.get("layers"), dict) or not isinstance(record.get("step"), int):
            raise TelemetryError(f"{path}:{number}: a routing record without `step` and `layers`")
        records.append(record)
    return records


def record_routing_stats(record: Mapping, kind: Optional[str] = None) -> RoutingStats:
    """A record's per-task distributions as `RoutingStats` (counts = the task's share times its tokens; tasks
    not seen in the window get zero rows, which the similarity functions leave out), optionally of one kind."""
    tasks = list(record["tasks"])
    layers = []
    for name, entry in record["layers"].items():
        if kind is not None and entry["kind"] != kind:
            continue
        width = len(entry["share"])
        counts_GX = np.zeros((len(tasks), width))
        tokens_G = np.zeros(len(tasks))
        for task, share in entry.get("task_share", {}).items():
            if task in tasks:
                g = tasks.index(task)
                tokens_G[g] = entry["task_tokens"][task]
                counts_GX[g] = np.asarray([0.0 if v is None else v for v in share]) * tokens_G[g]
        layers.append(LayerRouting(name=name, kind=entry["kind"], counts_GX=counts_GX, tokens_G=tokens_G))
    return RoutingStats(tasks=tasks, layers=layers)
