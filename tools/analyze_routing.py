#!/usr/bin/env python
"""Which experts and adapters each task uses, and do similar languages share them? Routing analysis of a checkpoint,
or of a run's routing over training from its logs.

  python tools/analyze_routing.py --checkpoint demo_output/run --data demo_output/bible --split test \\
      --max-sentences 200 --out routing_analysis
  python tools/analyze_routing.py --metrics demo_output/run/metrics.jsonl --out routing_over_training

With --metrics (a metrics.jsonl, or the run directory holding it) the pictures come from the `routing` records the
trainer logs every train.log_interval steps (train.routing_stats), without loading the model:

  load.png        per MoE layer over the steps: max/mean expert load (and its p50/p95 over layers), router
                  entropy, share of assignments dropped by capacity, experts that received nothing
  families.png    within- vs across-family similarity of the tasks' expert use (and adapter use) over the steps
  adapters.png    per dynamic adapter block: each task's most used adapter over the steps (models with adapters)
  routing.png     the last record's per-task expert/adapter use, as heatmaps
  telemetry.json  {"source", "series" (the per-layer time series), "families" (per step), "warnings" (collapses
                  the trainer reported)}

With --checkpoint it runs the checkpoint teacher-forced over --data (a raw bitext directory as tools/evaluate.py
reads, or a tools/preprocess_data.py output with manifest.json) and writes into --out (a new directory, made
atomically):

  routing.png     per-task expert usage of every MoE layer and adapter choice of every adapter block, as heatmaps
                  (Kudugunta et al. 2021, Figure 3)
  similarity.png  task clustering (average-linkage dendrogram) and task x task similarity heatmaps: all layers,
                  MoE layers only, adapter blocks only
  routing.json    {"source", "routing" (counts per task and expert/adapter, per layer), "similarity" (G x G
                  matrices: overall, experts, adapters, per layer), "clustering", "families" (within- vs
                  across-family similarity; megatron_taskmoe.analysis.similarity.family_overlap)}

Similarity is 1 - Jensen-Shannon distance between two tasks' usage distributions (or cosine with --metric cosine),
averaged over layers; see megatron_taskmoe/analysis/similarity.py. Languages are grouped by --families (a JSON
object language -> family; default: the Bible languages, Romance fr es it pt ro, Germanic en de, Slavic ru pl,
Turkic tr, Indo-Aryan hi).

Exit status 2: bad option, checkpoint or data (one line on stderr naming it); nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from translate import quiet_megatron  # noqa: E402

# Imports of torch, megatron-core and this package sit inside the functions: `--help` and option errors answer
# before their (slow) import.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint directory, checkpoint root or run dir")
    source.add_argument("--metrics", type=Path, help="a run's metrics.jsonl (or its run directory): routing over "
                        "training from the logged routing records, without the model")
    p.add_argument("--data", type=Path, help="with --checkpoint: raw bitext directory ({split}.{a}-{b}.{a}/.{b}, "
                   "TSV, JSONL) or preprocessed directory")
    p.add_argument("--split", default="test", help="split to run (e.g. valid, test)")
    p.add_argument("--directions", nargs="+", default=None, help="e.g. de-en en-de (default: all trained ones)")
    p.add_argument("--max-sentences", type=int, default=500, help="first N pairs per direction; 0: all")
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--families", type=Path, default=None, help="JSON file: {language: family}")
    p.add_argument("--pivot", default="en", help="the language every task pairs with (a task's language is its "
                   "other side)")
    p.add_argument("--metric", choices=("js", "cosine"), default="js")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch (raw text)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


class AnalysisError(ValueError):
    """Bad input to this tool; the message names the path or option (exit 2)."""


def load_families(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        families = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AnalysisError(f"--families {path}: {e}") from None
    if not isinstance(families, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in families.items()):
        raise AnalysisError(f"--families {path}: expected a JSON object of language -> family names")
    return families


def choose(requested, available: list[str], trained: list[str], data: Path) -> list[str]:
    if requested is None:
        chosen = [d for d in sorted(available) if d in trained]
        if not chosen:
            raise AnalysisError(f"--data {data}: none of its directions ({', '.join(sorted(available)) or 'none'}) "
                                f"was trained (trained: {', '.join(trained)})")
        return chosen
    for d in requested:
        if d not in available:
            raise AnalysisError(f"--directions {d}: not in --data {data} (available: {', '.join(sorted(available))})")
        if d not in trained:
            raise AnalysisError(f"--directions {d}: the checkpoint was not trained on it (trained: "
                                f"{', '.join(trained)})")
    return list(requested)


def batches(args, loaded, trained: list[str]):
    """(directions, batch iterable) for raw or preprocessed --data."""
    from megatron_taskmoe.analysis.routing import bitext_batches, dataset_batches
    from megatron_taskmoe.inference import Translator, TranslatorConfig

    if not args.data.is_dir():
        raise AnalysisError(f"--data {args.data}: not a directory")
    if (args.data / "manifest.json").is_file():
        from megatron_taskmoe.data.manifest import load_manifest

        manifest = load_manifest(args.data)
        if manifest["task_map"] != loaded.task_map:
            raise AnalysisError(f"--data {args.data}: its task map differs from the checkpoint's (tasks "
                                f"{manifest['task_map']['tasks']} vs {loaded.task_map['tasks']})")
        available = [d for d, entry in manifest["directions"].items() if args.split in entry.get("splits", {})]
        if not available:
            raise AnalysisError(f"--data {args.data}: no {args.split!r} split in its manifest")
        directions = choose(args.directions, available, trained, args.data)
        return directions, dataset_batches(args.data, args.split, model_config=loaded.model_config,
                                           directions=directions, max_sentences=args.max_sentences)
    from evaluate import load_test_pairs

    pairs = load_test_pairs(args.data, args.split)
    directions = choose(args.directions, list(pairs), trained, args.data)
    if args.max_sentences:
        pairs = {d: (s[: args.max_sentences], r[: args.max_sentences]) for d, (s, r) in pairs.items()}
    translator = Translator(loaded, TranslatorConfig(batch_size=args.batch_size))
    return directions, bitext_batches(translator, {d: pairs[d] for d in directions})


def analyze(stats, *, families=None, pivot: str = "en", metric: str = "js") -> dict:
    """The JSON document's analysis part: similarity matrices, clustering and the family summary."""
    from megatron_taskmoe.analysis.similarity import DEFAULT_FAMILIES, cluster_tasks, family_overlap, \
        matrix_to_json, task_similarity

    sims = task_similarity(stats, metric)
    clustering = cluster_tasks(sims["overall"], sims["tasks"])
    overlap = family_overlap(stats, families, metric=metric, pivot=pivot)
    doc = {"similarity": {"metric": sims["metric"], "tasks": sims["tasks"],
                          **{k: matrix_to_json(sims[k]) for k in ("overall", "experts", "adapters")},
                          "per_layer": {name: matrix_to_json(m) for name, m in sims["per_layer"].items()}},
           "clustering": clustering,
           "families": {"map": dict(DEFAULT_FAMILIES if families is None else families), **overlap}}
    return doc, sims, clustering


def analyze_metrics(args, fail) -> int:
    """--metrics mode: pictures over training steps from the routing records (see the module docstring)."""
    from megatron_taskmoe.analysis.similarity import METRIC_NAMES
    from megatron_taskmoe.analysis.telemetry import TelemetryError, read_routing_records, record_routing_stats
    from megatron_taskmoe.analysis.routing import plot_routing
    from megatron_taskmoe.analysis.telemetry_plots import (adapter_blocks, family_series, plot_adapters, plot_family,
                                                           plot_load, telemetry_series)
    from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
    from megatron_taskmoe.checkpoint_tools.outputs import atomic_dir, check_output

    path = args.metrics / "metrics.jsonl" if args.metrics.is_dir() else args.metrics
    try:
        check_output(args.out, args.overwrite)
        families = load_families(args.families)
        if not path.is_file():
            raise AnalysisError(f"--metrics {path}: no such file")
        records = read_routing_records(path)
        if not records:
            raise AnalysisError(f"--metrics {path}: no routing records (the run logs them with "
                                "train.routing_stats=true, every train.log_interval steps, for models with MoE layers)")
        series = telemetry_series(records)
        points = family_series(records, families, metric=args.metric, pivot=args.pivot)
        written = []
        with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            name = path.parent.name or str(path)
            if any(s["kind"] == "experts" for s in series["layers"].values()):
                plot_load(series, tmp / "load.png", title=f"expert load per MoE layer: {name}")
                written.append("load.png")
            try:
                plot_family(points, tmp / "families.png", metric_name=METRIC_NAMES[args.metric],
                            title=f"routing similarity of tasks within vs across language families: {name}")
                written.append("families.png")
            except ValueError as e:  # e.g. tasks without a known family: the other pictures still say something
                print(f"analyze_routing.py: no families.png: {e}", file=sys.stderr)
            if adapter_blocks(records):
                plot_adapters(records, tmp / "adapters.png", title=f"adapter assignment per task: {name}")
                written.append("adapters.png")
            last = record_routing_stats(records[-1])
            if last.layers:
                plot_routing(last, tmp / "routing.png", title=f"routing per task at step {records[-1]['step']}: {name}")
                written.append("routing.png")
            doc = {"source": {"metrics": str(path), "records": len(records), "first_step": records[0]["step"],
                              "last_step": records[-1]["step"]},
                   "series": series, "families": points,
                   "warnings": [w for r in records for w in r.get("warnings", [])]}
            text = json.dumps(_nan_to_none(doc), indent=1, allow_nan=False) + "\n"
            (tmp / "telemetry.json").write_text(text, encoding="utf-8")
            written.append("telemetry.json")
    except (AnalysisError, TelemetryError, CheckpointToolError) as e:
        return fail(str(e))
    last_point = points[-1] if points else None
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{len(records)} routing records, steps {records[0]['step']}-{records[-1]['step']}; load ratio p95 at the "
          f"last step {fmt(records[-1].get('load_ratio_p95'))}"
          + (f"; family similarity within {fmt(last_point['within'])}, across {fmt(last_point['across'])}"
             if last_point else "")
          + f"\nwrote {args.out}/{', '.join(written)}")
    return 0


def _nan_to_none(o):
    """NaN (a series' missing value) as JSON null, throughout."""
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_megatron(args.verbose)

    def fail(message: str) -> int:
        print(f"analyze_routing.py: error: {message}", file=sys.stderr)
        return 2

    if args.metrics is not None:
        return analyze_metrics(args, fail)
    if args.data is None:
        return fail("--data is required with --checkpoint")
    if args.max_sentences < 0:
        return fail(f"--max-sentences must be >= 0, got {args.max_sentences}")
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")

    from megatron_taskmoe import compat
    from megatron_taskmoe.analysis.routing import collect_routing_stats, plot_routing
    from megatron_taskmoe.analysis.similarity import plot_similarity
    from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
    from megatron_taskmoe.checkpoint_tools.outputs import atomic_dir, check_output
    from megatron_taskmoe.data.bitext import DataError
    from megatron_taskmoe.inference import InferenceError, find_checkpoint, load_checkpoint

    compat.apply()

    try:
        check_output(args.out, args.overwrite)
        families = load_families(args.families)
        info = find_checkpoint(args.checkpoint)
        loaded = load_checkpoint(info.path, device=args.device)
        trained = sorted(loaded.task_map.get("direction_to_task", {}))
        directions, runs = batches(args, loaded, trained)
        stats = collect_routing_stats(loaded.model, runs, task_names=loaded.task_map["tasks"])
        doc, sims, clustering = analyze(stats, families=families, pivot=args.pivot, metric=args.metric)
        with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            plot_routing(stats, tmp / "routing.png", title=f"routing per task: {info.path.name}, {args.split}")
            if len(clustering["order"]) >= 2:
                plot_similarity(sims, clustering, tmp / "similarity.png",
                                title=f"task similarity from routing ({sims['metric']}): {info.path.name}")
            source = {"checkpoint": str(info.path), "step": info.step, "data": str(args.data), "split": args.split,
                      "directions": directions, "max_sentences": args.max_sentences}
            text = json.dumps({"source": source, "routing": stats.to_dict(), **doc}, indent=2) + "\n"
            (tmp / "routing.json").write_text(text, encoding="utf-8")
    except (AnalysisError, InferenceError, DataError, CheckpointToolError) as e:
        return fail(str(e))
    except ValueError as e:  # e.g. a dense checkpoint: nothing task-aware to count
        return fail(f"{args.checkpoint}: {e}")
    fam = doc["families"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"tasks clustered: {' '.join(clustering['order'])}\n"
          f"similarity within families {fmt(fam['within'])} ({fam['within_pairs']} pairs), across "
          f"{fmt(fam['across'])} ({fam['across_pairs']} pairs)\nwrote {args.out}/routing.json, routing.png"
          f"{', similarity.png' if len(clustering['order']) >= 2 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
