"""Do similar tasks share experts and adapters? Task x task similarity from routing statistics, its clustering,
and a within-family vs across-family summary.

Each task's routing in one layer is a distribution over the layer's experts (or adapters): `LayerRouting.load_GX`,
the task's share of its assignments. Two tasks are compared by

    similarity = 1 - JSD(p, q) ** 0.5      (Jensen-Shannon divergence, log base 2)

the complement of the Jensen-Shannon *distance*. Why this and not cosine: it is made for probability
distributions, symmetric and defined when a task never uses an expert (KL is not); it lies in [0, 1] with 1 exactly
for identical usage and 0 exactly for disjoint experts, whatever the number of experts; and the distance is a
metric (triangle inequality), so average-linkage clustering on it behaves. Cosine (`metric="cosine"`) is offered for
comparison; for non-negative vectors it is also 1 for identical and 0 for disjoint usage, but it weighs a
dominant expert quadratically.

A model's overall similarity is the mean of its layers' similarities (every MoE layer and adapter block counts
once, whatever its width); "experts" and "adapters" average over one kind only. A task no token of which reached a
layer has no distribution there; that layer is left out of its pairs' means (NaN if no layer is left).

Clustering is UPGMA (average linkage) on the distance 1 - similarity, returned in scipy's `linkage` format (scipy
is not a dependency), with the leaf order a dendrogram draws. `family_overlap` is the summary a paper table needs:
mean similarity of task pairs whose languages are in the same family against pairs across families.

Legend: G tasks, X experts or adapters, L layers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

import numpy as np

from megatron_taskmoe.analysis.routing import RoutingStats
from megatron_taskmoe.fileio import save_figure

Metric = Literal["js", "cosine"]
METRIC_NAMES = {"js": "1 - Jensen-Shannon distance (log2)", "cosine": "cosine similarity"}

# The Bible corpus's languages (examples/bible/prepare_data.py) by family; English is the pivot of every task there.
DEFAULT_FAMILIES: dict[str, str] = {
    "fr": "Romance", "es": "Romance", "it": "Romance", "pt": "Romance", "ro": "Romance",
    "en": "Germanic", "de": "Germanic",
    "ru": "Slavic", "pl": "Slavic",
    "tr": "Turkic",
    "hi": "Indo-Aryan",
}


# ------------------------------------------------------------------------------------------------ similarity
def _normalise(dist_GX: np.ndarray) -> np.ndarray:
    dist_GX = np.asarray(dist_GX, dtype=np.float64)
    if dist_GX.ndim != 2:
        raise ValueError(f"expected a tasks x experts matrix, got shape {dist_GX.shape}")
    if np.any(dist_GX < 0):
        raise ValueError("routing distributions must be non-negative")
    totals_G1 = dist_GX.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals_G1 > 0, dist_GX / np.where(totals_G1 > 0, totals_G1, 1.0), np.nan)


def pairwise_similarity(dist_GX: np.ndarray, metric: Metric = "js") -> np.ndarray:
    """G x G similarity of the rows of `dist_GX` (counts or shares; each row is normalised to sum to 1). Rows that
    are all zero or NaN (a task never seen) give NaN rows and columns; the diagonal of the others is 1."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"metric {metric!r} is not one of {list(METRIC_NAMES)}")
    p_GX = _normalise(np.nan_to_num(np.asarray(dist_GX, dtype=np.float64), nan=0.0))
    p_G1X, q_1GX = p_GX[:, None, :], p_GX[None, :, :]
    if metric == "cosine":
        dot_GG = (p_G1X * q_1GX).sum(-1)
        norm_G = np.sqrt((p_GX ** 2).sum(-1))
        sim_GG = dot_GG / (norm_G[:, None] * norm_G[None, :])
    else:
        m_GGX = 0.5 * (p_G1X + q_1GX)

        def kl(a, b):  # sum a log2(a / b) over a > 0 (where a > 0, m > 0 too)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(b > 0, b, 1.0)), 0.0).sum(-1)

        jsd_GG = 0.5 * kl(p_G1X, m_GGX) + 0.5 * kl(q_1GX, m_GGX)
        sim_GG = 1.0 - np.sqrt(np.clip(jsd_GG, 0.0, 1.0))
    sim_GG = np.clip(sim_GG, 0.0, 1.0)
    seen_G = ~np.isnan(p_GX).any(axis=1)
    sim_GG[~seen_G, :] = np.nan
    sim_GG[:, ~seen_G] = np.nan
    idx = np.flatnonzero(seen_G)
    sim_GG[idx, idx] = 1.0
    return sim_GG


def layer_similarities(stats: RoutingStats, metric: Metric = "js") -> dict[str, np.ndarray]:
    """{layer name: G x G similarity} for every MoE layer and adapter block, in the stats' order."""
    return {layer.name: pairwise_similarity(layer.counts_GX, metric) for layer in stats.layers}


def mean_similarity(sims_LGG: Sequence[np.ndarray], num_tasks: int) -> np.ndarray:
    """Mean over layers, ignoring the layers where a pair is NaN (NaN where every layer is)."""
    if not sims_LGG:
        return np.full((num_tasks, num_tasks), np.nan)
    stack_LGG = np.stack(list(sims_LGG))
    with np.errstate(invalid="ignore"):
        count_GG = (~np.isnan(stack_LGG)).sum(axis=0)
        return np.where(count_GG > 0, np.nansum(stack_LGG, axis=0) / np.maximum(count_GG, 1), np.nan)


def task_similarity(stats: RoutingStats, metric: Metric = "js") -> dict:
    """{"metric", "tasks", "overall", "experts", "adapters" (G x G arrays, NaN where undefined; "experts"/"adapters"
    NaN throughout when the model has none of that kind), "per_layer": {name: G x G}}."""
    if not stats.layers:
        raise ValueError("task_similarity: the routing statistics have no layers")
    per_layer = layer_similarities(stats, metric)
    G = len(stats.tasks)
    kinds = {kind: [per_layer[layer.name] for layer in stats.layers if layer.kind == kind]
             for kind in ("experts", "adapters")}
    return {"metric": METRIC_NAMES[metric], "tasks": list(stats.tasks),
            "overall": mean_similarity(list(per_layer.values()), G),
            "experts": mean_similarity(kinds["experts"], G), "adapters": mean_similarity(kinds["adapters"], G),
            "per_layer": per_layer}


# ------------------------------------------------------------------------------------------------ clustering
def average_linkage(dist_GG: np.ndarray) -> np.ndarray:
    """UPGMA clustering of a symmetric distance matrix, in scipy's `linkage` format: row i merges clusters
    `Z[i, 0] < Z[i, 1]` (0..G-1 are the tasks, G+i the cluster made by row i) at distance `Z[i, 2]` (the mean
    distance between their members) into a cluster of `Z[i, 3]` tasks. Ties go to the lowest cluster ids."""
    dist_GG = np.asarray(dist_GG, dtype=np.float64)
    G = dist_GG.shape[0]
    if dist_GG.shape != (G, G) or G < 1:
        raise ValueError(f"average_linkage: expected a square distance matrix, got shape {dist_GG.shape}")
    if not np.all(np.isfinite(dist_GG)):
        raise ValueError("average_linkage: distances must be finite (leave out tasks without routing data)")
    if not np.allclose(dist_GG, dist_GG.T):
        raise ValueError("average_linkage: the distance matrix is not symmetric")
    members = {i: [i] for i in range(G)}
    Z = np.zeros((max(G - 1, 0), 4))
    for row in range(G - 1):
        ids = sorted(members)
        best = None
        for ai, a in enumerate(ids):
            for b in ids[ai + 1:]:
                d = float(dist_GG[np.ix_(members[a], members[b])].mean())
                if best is None or d < best[0] - 1e-12:
                    best = (d, a, b)
        d, a, b = best
        members[G + row] = members.pop(a) + members.pop(b)
        Z[row] = (a, b, d, len(members[G + row]))
    return Z


def leaf_order(Z: np.ndarray, num_leaves: int) -> list[int]:
    """Leaves left to right as a dendrogram of `Z` draws them (first-merged cluster on the left)."""
    if num_leaves == 1:
        return [0]

    def walk(node: int) -> list[int]:
        if node < num_leaves:
            return [node]
        a, b = int(Z[node - num_leaves, 0]), int(Z[node - num_leaves, 1])
        return walk(a) + walk(b)

    return walk(2 * num_leaves - 2)


def cluster_tasks(sim_GG: np.ndarray, tasks: Sequence[str]) -> dict:
    """Average-linkage clustering of the tasks that have routing data (a NaN diagonal marks a task never seen).

    Returns {"tasks": clustered task names, "left_out": tasks without routing data, "linkage": scipy-format rows
    (indices into "tasks"), "order": dendrogram leaf order (names), "tree": nested [left, right, distance] lists}."""
    sim_GG = np.asarray(sim_GG, dtype=np.float64)
    if sim_GG.shape != (len(tasks), len(tasks)):
        raise ValueError(f"cluster_tasks: {len(tasks)} task names for a similarity matrix of shape {sim_GG.shape}")
    keep = [g for g in range(len(tasks)) if not np.isnan(sim_GG[g, g])]  # NaN diagonal: the task was never seen
    names = [tasks[g] for g in keep]
    left_out = [t for g, t in enumerate(tasks) if g not in keep]
    if not names:
        return {"tasks": [], "left_out": left_out, "linkage": [], "order": [], "tree": None}
    dist = 1.0 - sim_GG[np.ix_(keep, keep)]
    np.fill_diagonal(dist, 0.0)
    Z = average_linkage(dist)
    n = len(names)

    def tree(node: int):
        if node < n:
            return names[node]
        a, b, d, _ = Z[node - n]
        return [tree(int(a)), tree(int(b)), round(float(d), 6)]

    return {"tasks": names, "left_out": left_out, "linkage": Z.tolist(),
            "order": [names[i] for i in leaf_order(Z, n)], "tree": tree(2 * n - 2)}


# ------------------------------------------------------------------------------------------------ families
def task_languages(task: str, pivot: str = "en") -> tuple[list[str], Optional[str]]:
    """(non-pivot languages of a task name, its orientation): "fr-en" -> (["fr"], "into"), "en-fr" -> (["fr"],
    "out of"), "de-fr" -> (["de", "fr"], None), a target-language task "fr" -> (["fr"], None)."""
    parts = task.split("-")
    if len(parts) == 2:
        src, tgt = parts
        if tgt == pivot and src != pivot:
            return [src], "into"
        if src == pivot and tgt != pivot:
            return [tgt], "out of"
        return [p for p in parts if p != pivot] or [pivot], None
    return [task], None


def family_overlap(stats: RoutingStats, families: Optional[Mapping[str, str]] = None, *, metric: Metric = "js",
                   pivot: str = "en", same_orientation: bool = True) -> dict:
    """Mean routing similarity of task pairs within a language family vs across families.

    A task's language is its non-pivot side ("fr-en" and "en-fr" are both French). A pair is "within" when the two
    languages differ but share a family, "across" when the families differ, "same_language" for the two
    directions of one language, "unknown" when a language is not in `families` (default: `DEFAULT_FAMILIES`).
    With `same_orientation` (default) only pairs going the same way (both into the pivot, or both out of it) enter
    the within/across means: fr-en vs en-es differ by direction first, which would blur the family comparison;
    the other pairs are still listed, with `"compared": false`.

    Returns {"metric", "pivot", "same_orientation", "within", "across", "gap" (within - across), "within_pairs",
    "across_pairs", "by_kind": {"experts"|"adapters": {"within", "across", "gap"}}, "per_pair": [{"a", "b",
    "family_a", "family_b", "relation", "compared", "similarity", "experts", "adapters"}]}; a mean over no pair
    is None."""
    families = dict(DEFAULT_FAMILIES if families is None else families)
    sims = task_similarity(stats, metric)
    tasks = sims["tasks"]
    per_pair = []
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            (langs_a, way_a), (langs_b, way_b) = task_languages(tasks[i], pivot), task_languages(tasks[j], pivot)
            fam_a = families.get(langs_a[0]) if len(langs_a) == 1 else None
            fam_b = families.get(langs_b[0]) if len(langs_b) == 1 else None
            if fam_a is None or fam_b is None:
                relation = "unknown"
            elif langs_a == langs_b:
                relation = "same_language"
            else:
                relation = "within" if fam_a == fam_b else "across"
            compared = relation in ("within", "across") and (not same_orientation or way_a == way_b)
            per_pair.append({"a": tasks[i], "b": tasks[j], "family_a": fam_a, "family_b": fam_b,
                             "relation": relation, "compared": compared,
                             **{k: _num(sims[k][i, j]) for k in ("overall", "experts", "adapters")}})
            per_pair[-1]["similarity"] = per_pair[-1].pop("overall")

    def summary(key: str) -> dict:
        out = {}
        for relation in ("within", "across"):
            values = [p[key] for p in per_pair if p["compared"] and p["relation"] == relation and p[key] is not None]
            out[relation] = float(np.mean(values)) if values else None
            out[f"{relation}_pairs"] = len(values)
        out["gap"] = None if out["within"] is None or out["across"] is None else out["within"] - out["across"]
        return out

    overall = summary("similarity")
    return {"metric": sims["metric"], "pivot": pivot, "same_orientation": same_orientation, **overall,
            "by_kind": {k: {x: v for x, v in summary(k).items() if not x.endswith("_pairs")}
                        for k in ("experts", "adapters")},
            "per_pair": per_pair}


def _num(v) -> Optional[float]:
    v = float(v)
    return None if math.isnan(v) else v


def matrix_to_json(m_GG: np.ndarray) -> list[list[Optional[float]]]:
    return [[_num(v) for v in row] for row in np.asarray(m_GG)]


# ------------------------------------------------------------------------------------------------ picture
def _draw_dendrogram(ax, Z: np.ndarray, names: Sequence[str]) -> list[int]:
    """A left-to-right dendrogram (leaves on the y axis, top to bottom in leaf order); returns the leaf order."""
    n = len(names)
    order = leaf_order(Z, n)
    y = {leaf: float(pos) for pos, leaf in enumerate(order)}
    x = {leaf: 0.0 for leaf in range(n)}
    for row, (a, b, d, _) in enumerate(Z):
        a, b, node = int(a), int(b), n + row
        ax.plot([x[a], d, d, x[b]], [y[a], y[a], y[b], y[b]], color="tab:blue", lw=1.2, marker="o", ms=2)
        x[node], y[node] = float(d), (y[a] + y[b]) / 2
    ax.set_yticks(range(n), [names[i] for i in order], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(left=0.0, right=max(1e-3, float(Z[:, 2].max()) * 1.1) if len(Z) else 1.0)
    ax.set_xlabel("distance 1 - similarity (average linkage)", fontsize=8)
    ax.set_title("task clustering", fontsize=9)
    return order


def plot_similarity(sims: dict, clustering: dict, path, *, title: Optional[str] = None):
    """One PNG: the dendrogram of `clustering`, then the overall / experts / adapters similarity heatmaps with the
    tasks in dendrogram order; written to a temporary file and renamed."""
    # matplotlib only when plotting: its import is slow
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    names = clustering["order"]
    if len(names) < 2:
        raise ValueError("plot_similarity: fewer than two tasks with routing data")
    tasks = sims["tasks"]
    idx = [tasks.index(t) for t in names]
    panels = [k for k in ("overall", "experts", "adapters") if not np.isnan(sims[k][np.ix_(idx, idx)]).all()]
    G = len(names)
    side = 1.6 + 0.42 * G
    fig = Figure(figsize=(side * (len(panels) + 1) + 1.0, side + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    _draw_dendrogram(axes[0], np.asarray(clustering["linkage"]), clustering["tasks"])
    image = None
    for ax, kind in zip(axes[1:], panels):
        m_GG = sims[kind][np.ix_(idx, idx)]
        cmap = matplotlib.colormaps["magma"].with_extremes(bad="lightgray")  # NaN: a task without data there
        image = ax.imshow(np.ma.masked_invalid(m_GG), vmin=0.0, vmax=1.0, cmap=cmap, aspect="equal")
        ax.set_xticks(range(G), names, rotation=90, fontsize=7)
        ax.set_yticks(range(G), names, fontsize=7)
        ax.set_title({"overall": "all layers", "experts": "MoE layers (experts)",
                      "adapters": "adapter blocks"}[kind], fontsize=9)
        if G <= 12:
            for i in range(G):
                for j in range(G):
                    if not np.isnan(m_GG[i, j]):
                        ax.text(j, i, f"{m_GG[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if m_GG[i, j] < 0.6 else "black")
    fig.colorbar(image, ax=list(axes[1:]), shrink=0.8, label=sims["metric"])
    fig.suptitle(title or "task similarity from routing", fontsize=10)
    return save_figure(fig, path)
