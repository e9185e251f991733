"""Routing over training steps, from the `routing` records of a run's `metrics.jsonl` alone (no model needed).

`telemetry_series(records)` arranges the records as time series per layer; `family_series(records, families)` runs
`similarity.family_overlap` on every record's per-task distributions (within- vs across-family similarity of the
tasks' expert and adapter use, step by step). Pictures, PNG through matplotlib's Agg canvas (pyplot's global state
is never touched), each written to a temporary file and renamed:

  * `plot_load`: per MoE layer, max/mean expert load (with the p50/p95 over layers), router entropy, the share of
    assignments dropped by capacity and the experts that received nothing, against the step;
  * `plot_family`: within- and across-family similarity of the tasks' expert use (and adapter use) against the step;
  * `plot_adapters`: per dynamic adapter block, tasks x steps coloured by each task's most used adapter, the
    colour's strength its share.

Legend: G tasks, N records (log steps), A adapters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from megatron_taskmoe.analysis.similarity import family_overlap
from megatron_taskmoe.analysis.telemetry import record_routing_stats
from megatron_taskmoe.fileio import save_figure

LAYER_KEYS = ("load_ratio", "demand_load_ratio", "entropy", "dropped_fraction", "empty_experts")


def _value(v) -> float:
    return math.nan if v is None else float(v)


def telemetry_series(records: Sequence[Mapping]) -> dict:
    """{"steps": [N], "load_ratio_p50"/"load_ratio_p95"/"load_ratio_max"/"dropped_fraction": [N],
    "layers": {name: {"label", "kind", "steps": [...], key: [...] for LAYER_KEYS (experts) / "share"
    (adapters)}}}, NaN where a record has no value; layers in first-seen order."""
    out = {"steps": [r["step"] for r in records]}
    for key in ("load_ratio_p50", "load_ratio_p95", "load_ratio_max", "dropped_fraction"):
        out[key] = [_value(r.get(key)) for r in records]
    layers: dict[str, dict] = {}
    for r in records:
        for name, entry in r["layers"].items():
            series = layers.setdefault(name, {"label": entry["label"], "kind": entry["kind"], "steps": []})
            series["steps"].append(r["step"])
            if entry["kind"] == "experts":
                for key in LAYER_KEYS:
                    series.setdefault(key, []).append(_value(entry.get(key)))
            else:
                series.setdefault("share", []).append(entry["share"])
    out["layers"] = layers
    return out


def family_series(records: Sequence[Mapping], families: Optional[Mapping[str, str]] = None, *,
                  metric: str = "js", pivot: str = "en") -> list[dict]:
    """Per record: {"step", "within", "across", "gap", "within_pairs", "across_pairs", "by_kind"} of
    `family_overlap` on its per-task distributions (None where no pair could be compared)."""
    out = []
    for r in records:
        stats = record_routing_stats(r)
        if not stats.layers:
            continue
        overlap = family_overlap(stats, families, metric=metric, pivot=pivot)
        out.append({"step": r["step"], **{k: overlap[k] for k in ("within", "across", "gap", "within_pairs",
                                                                   "across_pairs", "by_kind")}})
    return out


def _figure(width: float, height: float):
    # matplotlib only when plotting: its import is slow
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_load(series: Mapping, path: str | Path, *, title: Optional[str] = None) -> Path:
    """Four panels against the step, one line per MoE layer: max/mean load (p50 and p95 over layers dashed),
    router entropy (nats), dropped share of assignments, experts that received nothing."""
    experts = {n: s for n, s in series["layers"].items() if s["kind"] == "experts"}
    if not experts:
        raise ValueError("plot_load: the records have no MoE layer")
    fig = _figure(12.0, 7.5)
    axes = fig.subplots(2, 2, squeeze=False).ravel()
    panels = (("load_ratio", "max / mean expert load (1 = balanced)"), ("entropy", "router entropy (nats)"),
              ("dropped_fraction", "share of assignments dropped by capacity"),
              ("empty_experts", "experts that received nothing"))
    colors = _colors(len(experts))
    for ax, (key, label) in zip(axes, panels):
        for color, s in zip(colors, experts.values()):
            ax.plot(s["steps"], s[key], color=color, lw=1.2, marker="o", ms=2, label=s["label"])
        if key == "load_ratio":
            ax.plot(series["steps"], series["load_ratio_p50"], color="black", ls="--", lw=1.0, label="p50 of layers")
            ax.plot(series["steps"], series["load_ratio_p95"], color="black", ls=":", lw=1.2, label="p95 of layers")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2 if len(experts) > 6 else 1)
    fig.suptitle(title or "expert load per MoE layer over training", fontsize=10)
    return save_figure(fig, Path(path))


def plot_family(points: Sequence[Mapping], path: str | Path, *, metric_name: str,
                title: Optional[str] = None) -> Path:
    """Within- vs across-family similarity of the tasks' routing against the step, for the MoE layers' experts
    and, when the model has them, the adapter blocks."""
    if not points:
        raise ValueError("plot_family: no record with per-task routing")
    steps = [p["step"] for p in points]
    fig = _figure(8.0, 4.5)
    ax = fig.subplots()
    drawn = False
    for kind, color in (("experts", "tab:blue"), ("adapters", "tab:orange")):
        for relation, style, text in (("within", "-", "within family"), ("across", "--", "across families")):
            values = [_value(p["by_kind"][kind][relation]) for p in points]
            if all(math.isnan(v) for v in values):
                continue  # no pair of that relation (e.g. one language per family)
            ax.plot(steps, values, color=color, lw=1.5, ls=style, marker="o", ms=3, label=f"{kind}: {text}")
            drawn = True
    if not drawn:
        raise ValueError("plot_family: no task pair could be compared (tasks without a known family, or one task)")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(metric_name, fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title or "do tasks of one language family route alike?", fontsize=10)
    return save_figure(fig, Path(path))


def adapter_blocks(records: Sequence[Mapping]) -> list[str]:
    """Names of the adapter blocks in the records, first-seen order."""
    names: dict[str, None] = {}
    for r in records:
        for name, entry in r["layers"].items():
            if entry["kind"] == "adapters":
                names[name] = None
    return list(names)


def adapter_choice_grid(records: Sequence[Mapping], name: str, tasks: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(most used adapter [G, N] (-1 where the task had no token), its share [G, N]) of one adapter block."""
    choice_GN = np.full((len(tasks), len(records)), -1, dtype=np.int64)
    share_GN = np.zeros((len(tasks), len(records)))
    for n, r in enumerate(records):
        entry = r["layers"].get(name)
        if entry is None:
            continue
        for task, share in entry["task_share"].items():
            if task in tasks:
                row = np.asarray([_value(v) for v in share])
                g = tasks.index(task)
                choice_GN[g, n], share_GN[g, n] = int(np.nanargmax(row)), float(np.nanmax(row))
    return choice_GN, share_GN


def plot_adapters(records: Sequence[Mapping], path: str | Path, *, title: Optional[str] = None,
                  max_cols: int = 2) -> Path:
    """One panel per adapter block: tasks x steps, coloured by the task's most used adapter, as strong as its
    share (white: the task had no token in that window)."""
    # matplotlib only when plotting: its import is slow
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    names = adapter_blocks(records)
    if not names:
        raise ValueError("plot_adapters: the records have no dynamic adapter block")
    tasks = list(records[-1]["tasks"])
    steps = [r["step"] for r in records]
    width = max(len(r["layers"][n]["share"]) for r in records for n in names if n in r["layers"])
    palette = [np.asarray(to_rgb(c)) for c in _colors(width)]
    cols = min(max_cols, len(names))
    rows = -(-len(names) // cols)
    fig = _figure(cols * (2.0 + 0.12 * len(steps)) + 1.5, rows * (0.9 + 0.3 * len(tasks)) + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        choice_GN, share_GN = adapter_choice_grid(records, name, tasks)
        image_GN3 = np.ones((len(tasks), len(records), 3))
        for g in range(len(tasks)):
            for n in range(len(records)):
                if choice_GN[g, n] >= 0:
                    image_GN3[g, n] = 1.0 - share_GN[g, n] * (1.0 - palette[choice_GN[g, n]])
        ax.imshow(image_GN3, aspect="auto", interpolation="nearest")
        label = next(r["layers"][name]["label"] for r in records if name in r["layers"])
        ax.set_title(label, fontsize=9)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ticks = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int)))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_axis_off()
    fig.legend(handles=[Patch(color=palette[a], label=f"A{a}") for a in range(width)], loc="outside right upper",
               fontsize=7, title="most used\nadapter", title_fontsize=7)
    fig.suptitle(title or "adapter assignment per task over training", fontsize=10)
    return save_figure(fig, Path(path))


def _colors(count: int) -> list:
    # matplotlib only when plotting: its import is slow
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]
