"""Which experts and adapters each task uses: routing statistics of a model over a data set, and their picture.

The counting lives in the model (`model/moe.py`: every `TaskTopKRouter` and `TaskAdapters` block counts, per task,
the real tokens it assigns to each expert/adapter once `set_routing_stats(model, True)` is on). This module drives
it: `collect_routing_stats(model, batches)` runs teacher-forced forward passes (the decoder sees the reference, as
in training, so decoder statistics count each target token once) and returns a `RoutingStats` of numpy arrays,
JSON-serialisable. `plot_routing(stats, path)` draws one tasks x experts heatmap per MoE layer plus one tasks x
adapters heatmap per adapter block, as a PNG (matplotlib's Agg canvas; pyplot's global state is never touched).

Batches come from raw bitext through an `inference.Translator` (`bitext_batches`) or from a preprocessed split
(`dataset_batches`). In a multi-process job pass the data-parallel group (and, under sequence parallelism, the
tensor-parallel one) as `groups` to sum the counts over ranks.

Legend: G tasks, E experts, A adapters, X either (experts or adapters).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

import numpy as np
import torch

from megatron_taskmoe.data.batching import MODEL_INPUT_KEYS, collate, eval_batches, to_device
from megatron_taskmoe.data.dataset import MultilingualDataset
from megatron_taskmoe.fileio import save_figure

_LAYER = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.")


def layer_label(name: str, kind: str) -> str:
    """A module name as a reader says it: `decoder.layers.3.mlp.router`, "experts" -> "decoder layer 4 experts"."""
    m = _LAYER.search(name)
    where = f"{m.group(1)} layer {int(m.group(2)) + 1}" if m else name
    return f"{where} {kind}"


def row_fractions(counts_GX: np.ndarray) -> np.ndarray:
    """Each task's share of its assignments per expert/adapter (rows sum to 1; NaN for a task never seen)."""
    counts_GX = np.asarray(counts_GX, dtype=np.float64)
    totals_G1 = counts_GX.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals_G1 > 0, counts_GX / np.where(totals_G1 > 0, totals_G1, 1.0), np.nan)


@dataclass(kw_only=True)
class LayerRouting:
    """One router (expert choice) or adapter block (adapter choice) of the model."""

    name: str
    """Module name in the model, e.g. `encoder.layers.1.mlp.router`."""
    kind: Literal["experts", "adapters"]
    """"experts": a router choosing experts; "adapters": an adapter block choosing adapters."""
    counts_GX: np.ndarray
    """Real tokens of task g assigned to expert/adapter x (a token counts once per chosen expert: top-k)."""
    tokens_G: np.ndarray
    """Real tokens of task g that passed this layer."""

    @property
    def label(self) -> str:
        return layer_label(self.name, self.kind)

    @property
    def load_GX(self) -> np.ndarray:
        return row_fractions(self.counts_GX)


@dataclass(kw_only=True)
class RoutingStats:
    """Per-task routing of every MoE layer and adapter block, encoder first, in module order."""

    tasks: list[str]
    """Task names in id order; row g of every layer's counts is task g."""
    layers: list[LayerRouting] = field(default_factory=list)
    """One entry per router and adapter block, encoder first, in module order."""

    def experts(self) -> list[LayerRouting]:
        return [layer for layer in self.layers if layer.kind == "experts"]

    def adapters(self) -> list[LayerRouting]:
        return [layer for layer in self.layers if layer.kind == "adapters"]

    def to_dict(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "layers": [{
                "name": layer.name, "label": layer.label, "kind": layer.kind,
                "counts": layer.counts_GX.tolist(), "tokens": layer.tokens_G.tolist(),
                "load": [[None if math.isnan(v) else v for v in row] for row in layer.load_GX.tolist()],
            } for layer in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "RoutingStats":
        try:
            layers = [LayerRouting(name=d["name"], kind=d["kind"], counts_GX=np.asarray(d["counts"], dtype=np.float64),
                                   tokens_G=np.asarray(d["tokens"], dtype=np.float64)) for d in data["layers"]]
            return cls(tasks=list(data["tasks"]), layers=layers)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a routing statistics document ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------ batches
def bitext_batches(translator, pairs: dict[str, tuple[Sequence[str], Sequence[str]]]) -> Iterable[dict]:
    """Teacher-forcing batches of raw sentence pairs {direction: (sources, targets)}, built as the trainer does."""
    for direction, (sources, targets) in pairs.items():
        src_lang, tgt_lang = direction.split("-")
        samples = translator.samples(sources, src_lang, tgt_lang, targets=targets)
        for _, batch in translator.batches(samples):
            yield batch


def dataset_batches(data_dir: str | Path, split: str, *, model_config, directions: Optional[list[str]] = None,
                    max_tokens: int = 4096, max_sentences: int = 0) -> Iterable[dict]:
    """Every sentence pair of a preprocessed split once (truncated to the model's positions, as in training), or
    the first `max_sentences` pairs of each direction (corpus order, batches of at most `max_tokens` padded
    tokens per side)."""
    data = MultilingualDataset(data_dir, split, directions, max_src_len=model_config.max_source_positions - 2,
                               max_tgt_len=model_config.max_target_positions - 1)
    for d, direction in enumerate(data.directions):
        if not max_sentences:
            yield from eval_batches(data, direction, max_tokens=max_tokens)
            continue
        lo = int(data.offsets_D[d])
        chunk, longest = [], 0
        for i in range(min(int(data.sizes_D[d]), max_sentences)):
            sample = data[lo + i]
            length = max(len(sample["src"]), len(sample["tgt_in"]))
            if chunk and (len(chunk) + 1) * max(longest, length) > max_tokens:
                yield collate(chunk)
                chunk, longest = [], 0
            chunk.append(sample)
            longest = max(longest, length)
        if chunk:
            yield collate(chunk)


# ------------------------------------------------------------------------------------------------ collecting
@torch.no_grad()
def collect_routing_stats(model: torch.nn.Module, batches: Iterable[dict], *, task_names: Sequence[str],
                          groups: Sequence = ()) -> RoutingStats:
    """Run `batches` through `model` (eval mode, teacher forcing) and return what its routers and adapters counted.

    The model's counters are zeroed first and switched off afterwards; `groups` are process groups to sum over."""
    # megatron-core only when collecting: the analysis package reads and plots metrics files without it
    from megatron_taskmoe.model.moe import all_reduce_routing_stats, reset_routing_stats, routing_stats, \
        set_routing_stats

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    set_routing_stats(model, True)
    try:
        seen = 0
        for batch in batches:
            model(**to_device(batch, device, keys=MODEL_INPUT_KEYS))
            seen += 1
        if seen == 0:
            raise ValueError("collect_routing_stats: no batches to run")
        raw = routing_stats(model)
        for group in groups:
            all_reduce_routing_stats(raw, group=group)
    finally:
        set_routing_stats(model, False)
        reset_routing_stats(model)
        model.train(was_training)
    if not raw:
        raise ValueError("collect_routing_stats: the model has no task-aware router or adapter to count "
                         "(a dense model, or routing without task ids)")
    layers = []
    for name, entry in raw.items():  # named_modules order: encoder layers, then decoder layers
        kind = "experts" if "expert_assignments" in entry else "adapters"
        counts = entry["expert_assignments" if kind == "experts" else "adapter_assignments"]
        if counts.shape[0] != len(task_names):
            raise ValueError(f"collect_routing_stats: {name} counts {counts.shape[0]} tasks but {len(task_names)} "
                             "task names were given")
        layers.append(LayerRouting(name=name, kind=kind, counts_GX=counts.detach().cpu().double().numpy(),
                                   tokens_G=entry["tokens"].detach().cpu().double().numpy()))
    return RoutingStats(tasks=list(task_names), layers=layers)


# ------------------------------------------------------------------------------------------------ picture
def plot_routing(stats: RoutingStats, path: str | Path, *, title: Optional[str] = None, max_cols: int = 4) -> Path:
    """A PNG of tasks x experts heatmaps (one panel per MoE layer), then tasks x adapters panels; written to a
    temporary file and renamed, so `path` is either the old file or the complete new one."""
    # matplotlib only when plotting: its import is slow
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = stats.experts() + stats.adapters()
    if not panels:
        raise ValueError("plot_routing: no routing statistics to draw")
    path = Path(path)
    G = len(stats.tasks)
    cols = min(max_cols, len(panels))
    rows = -(-len(panels) // cols)
    widest = max(p.counts_GX.shape[1] for p in panels)
    fig = Figure(figsize=(cols * (1.2 + 0.45 * widest) + 1.0, rows * (0.9 + 0.35 * G) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, layer in zip(axes.flat, panels):
        load_GX = layer.load_GX
        image = ax.imshow(np.nan_to_num(load_GX, nan=0.0), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        X = load_GX.shape[1]
        ax.set_title(layer.label, fontsize=9)
        ax.set_xticks(range(X), [f"{'E' if layer.kind == 'experts' else 'A'}{x}" for x in range(X)], fontsize=7)
        ax.set_yticks(range(G), stats.tasks, fontsize=7)
        if G * X <= 96:
            for g in range(G):
                for x in range(X):
                    v = load_GX[g, x]
                    if not math.isnan(v):
                        ax.text(x, g, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if v < 0.6 else "black")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of the task's assignments")
    fig.suptitle(title or "routing per task: experts per MoE layer, then adapters", fontsize=10)
    return save_figure(fig, path)
