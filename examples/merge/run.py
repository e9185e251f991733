#!/usr/bin/env python
"""Pham et al. 2023, section 5.2.2 / Figure 3 at demo scale: merge two task-MoE models trained on disjoint tasks.

Model A learns en<->X (default fr), model B en<->Y (default de), each a tiny shared-dynamic task-MoE
(`examples/configs/demo_bible.yaml`, one process each, trained side by side) on the Bible. They are merged with
`tools/checkpoint/merge.py` (their dynamic adapters concatenated 2 + 2 = 4, task tables re-indexed into the union's
ids, every other weight averaged), scored on all four directions, trained a few hundred steps on the union, and
scored again. The control: A and B each trained the same number of extra steps on their own tasks, restarted the
way the merged model is (weights only: fresh optimizer and LR schedule), so a gain of the merged model over the
control is the merge's, not the extra steps'. The table and the picture put, per direction: the model trained on it
alone (A or B), the merged model before any training and after it, and the control.

    python examples/merge/run.py merge_output            # ~15 min on 2 CPU cores
    python examples/merge/run.py merge_output --steps 2000 --merged-steps 500 --test-sentences 0

Writes into OUTPUT: bible/, spm.model, data_{a,b,union}/ (shared data prep, as examples/demo.sh), run_a/, run_b/,
merged/ (the merged checkpoint, step 0), run_merged/, control_{a,b}/ (A and B restarted at step 0, as
merged/) and run_control_{a,b}/, eval_*.json (tools/evaluate.py), routing_merged/ and
routing_run_merged/ (tools/analyze_routing.py of the merged model before and after training: does each task still
pick its own model's adapters?), logs/, and the results: results.json, results.md and results.png.

A stage whose output is already there is skipped, so an interrupted run continues where it stopped (training
resumes from its last checkpoint); OUTPUT/settings.json makes sure it was made with the same options. Exit 2 on a
bad option, 1 when a stage fails (its log is named).

It is an example, not a benchmark: at the default sizes BLEU is below 1 and noisy; chrF moves more smoothly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "configs" / "demo_bible.yaml"
sys.path.insert(0, str(ROOT))
from megatron_taskmoe.fileio import save_figure, write_text_atomic  # noqa: E402

BIBLE_LANGUAGES = ("de", "es", "fr", "hi", "it", "pl", "pt", "ro", "ru", "tr")


class StageError(RuntimeError):
    """A stage (training, merging, scoring) failed; the message names its log."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("output", type=Path, help="output directory (created; reused stages are skipped)")
    p.add_argument("--group-a", default="fr", help="model A's language, trained as en-X and X-en")
    p.add_argument("--group-b", default="de", help="model B's language, trained as en-Y and Y-en")
    p.add_argument("--steps", type=int, default=400, help="training steps of A and of B")
    p.add_argument("--merged-steps", type=int, default=200,
                   help="training steps of the merged model on the union (and of the control: A and B each)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the control (A and B trained --merged-steps more steps on their own tasks)")
    p.add_argument("--test-sentences", type=int, default=100, help="test pairs per direction; 0: all")
    p.add_argument("--beam", type=int, default=1, help="beam size of the evaluations (1: greedy)")
    p.add_argument("--config", type=Path, default=CONFIG, help="pretrain_mt.py config of all three trainings")
    p.add_argument("--sequential", action="store_true", help="train A and B one after the other, not side by side")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="preprocessing processes")
    args = p.parse_args(argv)
    for name in ("group_a", "group_b"):
        if getattr(args, name) not in BIBLE_LANGUAGES:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)!r} is not a Bible language "
                    f"({' '.join(BIBLE_LANGUAGES)})")
    if args.group_a == args.group_b:
        p.error(f"--group-a and --group-b are both {args.group_a!r}: the merge needs disjoint task sets")
    for name in ("steps", "merged_steps", "beam", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.test_sentences < 0:
        p.error(f"--test-sentences must be >= 0, got {args.test_sentences}")
    if not args.config.is_file():
        p.error(f"--config {args.config}: no such file")
    if args.output.exists() and not args.output.is_dir():
        p.error(f"output {args.output} exists and is not a directory")
    return args


# ------------------------------------------------------------------------------------------------ running stages
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}


def start(name: str, cmd: list, log_dir: Path) -> tuple[str, subprocess.Popen, Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    print(f"   $ {' '.join(map(str, cmd))}\n     (log: {log})", flush=True)
    f = open(log, "w", encoding="utf-8")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env())
    f.close()
    return name, proc, log


def wait(*jobs) -> None:
    failed = []
    for name, proc, log in jobs:
        if proc.wait() != 0:
            failed.append(f"{name} (exit {proc.returncode}; log {log}):\n" + "".join(
                log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:]))
    if failed:
        raise StageError("stage failed: " + "\n".join(failed))


def run(name: str, cmd: list, log_dir: Path) -> None:
    wait(start(name, cmd, log_dir))




def finished(run_dir: Path, steps: int) -> bool:
    """Whether `run_dir` has a complete checkpoint of step `steps` (the trainer writes `latest` last)."""
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:08d}"


# ------------------------------------------------------------------------------------------------ results
def build_results(args, details: dict, merged_label: str, timings: dict, seconds: float) -> dict:
    """{directions, systems, scores: {system: {direction: {bleu, chrf}}}, ...}; "alone" is, per direction, the
    model (A or B) that was trained on it, and the control (when `details` has "A+N" / "B+N") the same after N more
    steps."""
    a, b = args.group_a, args.group_b
    directions = [f"{a}-en", f"en-{a}", f"{b}-en", f"en-{b}"]
    scores = {label: {d: {"bleu": v["bleu"], "chrf": v["chrf"]} for d, v in rec.items() if isinstance(v, dict)}
              for label, rec in details.items()}

    def own_model(prefix_a: str, prefix_b: str) -> dict:
        return {d: {**scores[prefix_a if a in d.split("-") else prefix_b][d],
                    "model": prefix_a if a in d.split("-") else prefix_b} for d in directions}

    systems = {"alone": own_model("A", "B"), "merged@0": scores["merged@0"], merged_label: scores[merged_label]}
    control_a, control_b = f"A+{args.merged_steps}", f"B+{args.merged_steps}"
    if control_a in scores and control_b in scores:
        systems[control_label(args)] = own_model(control_a, control_b)
    averages = {name: {m: sum(s[d][m] for d in directions) / len(directions) for m in ("bleu", "chrf")}
                for name, s in systems.items()}
    sentences = {d: details["merged@0"][d]["sentences"] for d in directions}
    return {"experiment": "Pham et al. 2023, 5.2.2 / Figure 3 at demo scale", "directions": directions,
            "model_a": {"tasks": [f"{a}-en", f"en-{a}"], "steps": args.steps},
            "model_b": {"tasks": [f"{b}-en", f"en-{b}"], "steps": args.steps},
            "merged_steps": args.merged_steps, "control_steps": args.merged_steps if len(systems) > 3 else None,
            "beam": args.beam, "test_sentences": sentences,
            "systems": list(systems), "scores": systems, "averages": averages,
            "signature": details["merged@0"][directions[0]]["signature"],
            "seconds": {**timings, "total": round(seconds, 1)}}


def control_label(args) -> str:
    return f"alone+{args.merged_steps}"


def _system_names(results: dict) -> dict[str, str]:
    names = {"alone": "A or B alone", **{s: s for s in results["systems"][1:]}}
    if results.get("control_steps"):
        names[f"alone+{results['control_steps']}"] = f"A or B +{results['control_steps']} steps (control)"
    return names


def own_adapter_share(doc: dict, origin: dict, group_a: str) -> dict[str, float]:
    """Per task: the share of its adapter assignments (mean over adapter blocks) that go to the adapters of the
    model that was trained on it (`origin`: merged_from.adapters, {"a": ids, "b": ids} in the merged model)."""
    tasks = doc["routing"]["tasks"]
    blocks = [layer for layer in doc["routing"]["layers"] if layer["kind"] == "adapters"]
    out = {}
    for g, task in enumerate(tasks):
        own = origin["a" if group_a in task.split("-") else "b"]
        shares = [sum(block["counts"][g][x] for x in own) / sum(block["counts"][g]) for block in blocks
                  if sum(block["counts"][g]) > 0]
        if shares:
            out[task] = sum(shares) / len(shares)
    return out


def to_markdown(results: dict) -> str:
    directions, systems = results["directions"], results["systems"]
    names = _system_names(results)
    lines = []
    for metric, title in (("bleu", "BLEU"), ("chrf", "chrF")):
        lines += [f"### {title}", "", "| system | " + " | ".join(directions) + " | avg |",
                  "|---|" + "---:|" * (len(directions) + 1)]
        for s in systems:
            row = [f"{results['scores'][s][d][metric]:.1f}" for d in directions]
            lines.append(f"| {names[s]} | " + " | ".join(row) + f" | {results['averages'][s][metric]:.1f} |")
        lines.append("")
    if results.get("own_adapter_share"):
        lines += ["### Adapter choice", "", "Share of each task's adapter assignments (mean over adapter blocks) that "
                  "go to the adapters of the model trained on it (A's for the first two directions, B's for the "
                  "others):", "", "| system | " + " | ".join(directions) + " |", "|---|" + "---:|" * len(directions)]
        for s, share in results["own_adapter_share"].items():
            lines.append(f"| {s} | " + " | ".join(f"{share[d]:.2f}" if d in share else "-" for d in directions)
                         + " |")
        lines.append("")
    n = sorted(set(results["test_sentences"].values()))
    lines.append(f"A: {', '.join(results['model_a']['tasks'])}, B: {', '.join(results['model_b']['tasks'])}, "
                 f"{results['model_a']['steps']} steps each; merged model trained {results['merged_steps']} steps on "
                 f"the union" + (f"; control: A and B each trained {results['control_steps']} more steps on their own "
                                 "tasks, restarted like the merged model (fresh optimizer and LR schedule)"
                                 if results.get("control_steps") else "")
                 + f"; test pairs per direction: {'/'.join(map(str, n))}, beam {results['beam']}; "
                 f"{results['seconds']['total'] / 60:.1f} min (this invocation).")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Grouped bars per direction (as Pham et al.'s Figure 3), BLEU and chrF side by side; atomic PNG."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directions, systems = results["directions"], results["systems"]
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    x = np.arange(len(directions))
    width = 0.8 / len(systems)
    labels = _system_names(results)
    for ax, (metric, title) in zip(axes, (("bleu", "BLEU"), ("chrf", "chrF"))):
        for i, s in enumerate(systems):
            values = [results["scores"][s][d][metric] for d in directions]
            bars = ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, label=labels[s])
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(x, directions)
        ax.set_title(f"test {title} per direction")
        ax.set_ylabel(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"merging task-MoE A ({', '.join(results['model_a']['tasks'])}) and B "
                 f"({', '.join(results['model_b']['tasks'])})", fontsize=10)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ the experiment
def prepare(args, out: Path, logs: Path) -> dict[str, Path]:
    """Raw Bible bitext, one joint tokenizer, and three preprocessed corpora (A's, B's and their union) that share
    it: the models' embeddings must mean the same pieces for averaging to make sense."""
    py, a, b = sys.executable, args.group_a, args.group_b
    bible = out / "bible"
    if not all((bible / f"{s}.en-{x}.{x}").is_file() for s in ("train", "valid", "test") for x in (a, b)):
        print(f"== prepare Bible bitext (en <-> {a}, {b})", flush=True)
        run("prepare_data", [py, "examples/bible/prepare_data.py", "--output-dir", bible, "--languages", a, b], logs)
    if not (out / "spm.model").is_file():
        print("== train the joint sentencepiece tokenizer", flush=True)
        run("train_tokenizer", [py, "tools/train_tokenizer.py", "--input-dir", bible, "--output-prefix",
                                out / "spm", "--vocab-size", "4000", "--sentences", "100000", "--temperature", "5"],
            logs)
    data = {}
    for key, langs in (("a", (a,)), ("b", (b,)), ("union", (a, b))):
        raw, data[key] = out / f"raw_{key}", out / f"data_{key}"
        if (data[key] / "manifest.json").is_file():
            continue
        print(f"== preprocess {key}: en <-> {', '.join(langs)}", flush=True)
        raw.mkdir(exist_ok=True)
        for lang in langs:
            for path in bible.glob(f"*.en-{lang}.*"):
                link = raw / path.name
                if not link.exists():
                    link.symlink_to(path.resolve())
        run(f"preprocess_{key}", [py, "tools/preprocess_data.py", "--input-dir", raw, "--tokenizer",
                                  out / "spm.model", "--output-dir", data[key], "--workers", args.workers,
                                  "--max-len", "90", "--max-ratio", "3", "--no-progress"], logs)
    return data


def train_cmd(args, data_dir: Path, run_dir: Path, steps: int, *extra: str) -> list:
    return [sys.executable, "pretrain_mt.py", "--config", args.config, "--set", f"data.data_dir={data_dir}",
            "--set", f"train.run_dir={run_dir}", "--set", f"train.steps={steps}", "--set", "parallel.expert=1",
            "--set", "train.progress_bar=false", "--set", "eval.interval=0", "--set", f"checkpoint.interval={steps}",
            *[x for e in extra for x in ("--set", e)]]


def evaluate_cmd(args, systems: list[tuple[str, Path]], data: Path, output: Path) -> list:
    cmd = [sys.executable, "tools/evaluate.py", "--data", data, "--split", "test", "--beam", args.beam,
           "--max-sentences", args.test_sentences, "--metric", "both", "--format", "json", "--output", output]
    for label, checkpoint in systems:
        cmd += ["--checkpoint", checkpoint, "--system", label]
    return cmd


def restart_cmds(args, checkpoint: Path, restarted: Path) -> list[list]:
    """`checkpoint`'s weights as a trainer checkpoint at step 0 with a fresh optimizer and the LR schedule of an
    --merged-steps run, as tools/checkpoint/merge.py writes the merged model: through one parallelism-free file."""
    single = restarted.with_suffix(".safetensors")
    convert = [sys.executable, "tools/checkpoint/convert.py"]
    return [[*convert, checkpoint, single, "--overwrite"],
            [*convert, single, restarted, "--config", args.config, "--set", f"train.steps={args.merged_steps}"]]


def analyze_cmd(args, checkpoint: Path, out: Path) -> list:
    return [sys.executable, "tools/analyze_routing.py", "--checkpoint", checkpoint, "--data", out / "bible",
            "--split", "test", "--max-sentences", args.test_sentences, "--out", out / f"routing_{checkpoint.name}",
            "--overwrite"]


def main(argv=None) -> int:
    """The stages in order; on 2+ cores the evaluation of A and B, and the routing analysis of the merged model
    before training, run beside the critical path (merge -> evaluate merged@0 -> train -> evaluate)."""
    args = parse_args(argv)
    out = args.output.resolve()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k not in ("output", "sequential", "workers")}
    if (out / "settings.json").is_file():  # reused stages must come from the same settings
        old = json.loads((out / "settings.json").read_text())
        if old != settings:
            diff = ", ".join(f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v)
            print(f"run.py: error: {out} was made with other settings ({diff}): use a new output directory",
                  file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "settings.json", json.dumps(settings, indent=2) + "\n")
    logs = out / "logs"
    began = time.perf_counter()
    timings: dict[str, float] = {}
    background = []
    merged, run_merged, label = out / "merged", out / "run_merged", f"merged@{args.merged_steps}"
    evals = {"alone": out / "eval_alone.json", "merged@0": out / "eval_merged_0.json",
             label: out / f"eval_merged_{args.merged_steps}.json"}
    if args.control:
        evals["control"] = out / f"eval_control_{args.merged_steps}.json"

    def lap(stage: str, since: float) -> float:
        timings[stage] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    try:
        t = time.perf_counter()
        data = prepare(args, out, logs)
        t = lap("data", t)

        print(f"== train A (en <-> {args.group_a}) and B (en <-> {args.group_b}), {args.steps} steps each", flush=True)
        jobs = []
        for key in ("a", "b"):
            if not finished(out / f"run_{key}", args.steps):
                jobs.append(start(f"train_{key}", train_cmd(args, data[key], out / f"run_{key}", args.steps), logs))
                if args.sequential:
                    wait(jobs.pop())
        wait(*jobs)
        t = lap("train A and B", t)

        if not evals["alone"].is_file():
            print("== evaluate A and B on their own tasks (in the background)", flush=True)
            background.append(start("evaluate_alone", evaluate_cmd(args, [("A", out / "run_a"), ("B", out / "run_b")],
                                                                   out / "bible", evals["alone"]), logs))
        if not (merged / "checkpoint.json").is_file():
            print("== merge A and B (tools/checkpoint/merge.py)", flush=True)
            run("merge", [sys.executable, "tools/checkpoint/merge.py", out / "run_a" / "checkpoints",
                          out / "run_b" / "checkpoints", merged, "--data-dir", data["union"], "--config",
                          args.config, "--set", f"train.steps={args.merged_steps}"], logs)
        record = json.loads((merged / "checkpoint.json").read_text())
        adapters = record["model_config"]["moe"]["adapters"]
        merged_flags = ([f"model.overrides.moe.adapters.num_adapters={adapters['num_adapters']}"]
                        if adapters["mode"] in ("dynamic", "shared_dynamic") else [])
        t = lap("merge", t)

        if not evals["merged@0"].is_file():
            print("== evaluate the merged model before training on the union", flush=True)
            run("evaluate_merged_0", evaluate_cmd(args, [("merged@0", merged)], out / "bible", evals["merged@0"]),
                logs)
        if not (out / "routing_merged" / "routing.json").is_file():
            background.append(start("analyze_merged", analyze_cmd(args, merged, out), logs))
        t = lap("evaluate merged@0", t)

        print(f"== train the merged model {args.merged_steps} steps on the union", flush=True)
        if not finished(run_merged, args.merged_steps):
            run("train_merged", train_cmd(args, data["union"], run_merged, args.merged_steps,
                                          f"checkpoint.load={merged}", *merged_flags), logs)
        t = lap("train merged", t)

        print("== evaluate the merged model after training; its routing (tools/analyze_routing.py)", flush=True)
        if not evals[label].is_file():
            run("evaluate_merged", evaluate_cmd(args, [(label, run_merged)], out / "bible", evals[label]), logs)
        if not (out / "routing_run_merged" / "routing.json").is_file():
            run("analyze_run_merged", analyze_cmd(args, run_merged, out), logs)
        t = lap(f"evaluate {label}", t)

        if args.control:
            print(f"== control: A and B restarted like the merged model, {args.merged_steps} more steps each on "
                  "their own tasks", flush=True)
            jobs = []
            for key in ("a", "b"):
                restarted, run_dir = out / f"control_{key}", out / f"run_control_{key}"
                if not (restarted / "checkpoint.json").is_file():
                    for i, cmd in enumerate(restart_cmds(args, out / f"run_{key}" / "checkpoints", restarted)):
                        run(f"restart_{key}_{i}", cmd, logs)
                if not finished(run_dir, args.merged_steps):
                    jobs.append(start(f"train_control_{key}", train_cmd(args, data[key], run_dir, args.merged_steps,
                                                                        f"checkpoint.load={restarted}"), logs))
                    if args.sequential:
                        wait(jobs.pop())
            wait(*jobs)
            if not evals["control"].is_file():
                n = args.merged_steps
                run("evaluate_control", evaluate_cmd(args, [(f"A+{n}", out / "run_control_a"),
                                                            (f"B+{n}", out / "run_control_b")],
                                                     out / "bible", evals["control"]), logs)
            t = lap("control", t)
        wait(*background)
        lap("wait for the background jobs", t)
    except StageError as e:
        for _, proc, _ in background:
            proc.kill()
        print(f"run.py: error: {e}", file=sys.stderr)
        return 1

    details = {k: v for path in evals.values() for k, v in json.loads(path.read_text())["details"].items()}
    results = build_results(args, details, label, timings, time.perf_counter() - began)
    origin = record["merged_from"]["adapters"]
    if origin:  # dynamic adapters: which model's adapters does each task pick?
        results["own_adapter_share"] = {
            system: own_adapter_share(json.loads((out / f"routing_{name}" / "routing.json").read_text()), origin,
                                      args.group_a)
            for system, name in (("merged@0", "merged"), (label, "run_merged"))}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", to_markdown(results))
    plot_results(results, out / "results.png")
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
