#!/usr/bin/env python
"""Kudugunta et al. 2021's serving comparison: a token-MoE and a task-MoE of the same size, each served as it can be.

    python benchmarks/serving.py --out runs/serving                                  # paper width, 32 experts
    python benchmarks/serving.py --out runs/serving_small --size small --experts 16 --steps 600
    python benchmarks/serving.py --out runs/serving_untrained --untrained                 # throughput only
    python benchmarks/serving.py --out runs/serving_untrained --untrained --dtype bf16    # our decoder in bf16
    python benchmarks/serving.py --out runs/serving_gpu --untrained --device cuda --dtype bf16   # on a GPU

Their claim: a task-level MoE's sub-network for one task (here: one target language) is a small dense model that
serves at 1.9x (32 experts) to 2.6x (128 experts) the throughput of a token-level MoE of the same quality, which must
be served whole. In order (each step is skipped when its output exists, so an interrupted run continues):
  1. data     the Bible en <-> --languages (examples/bible/prepare_data.py, as examples/demo.sh), a joint
              sentencepiece tokenizer and megatron indexed datasets;
  2. train    two models with the same sizes, experts, data order, token budget and seed: the presets
              `kudugunta_token` (every token routed by its representation, top-2) and `kudugunta_target` (both sides
              routed by target language, top-2), `--steps` steps of pretrain_mt.py each. With `--untrained` each
              model is only initialised as pretrain_mt.py would at step 0 for the same config (training/initial.py:
              no optimizer, no DDP buffers, so the paper width fits a machine that cannot train it) and written to
              OUT/<system>/model.safetensors, and the steps below run on those files: throughput does not depend
              on training, but untrained models translate nothing (their BLEU/chrF mean nothing, outputs run long);
  3. serve    the task-MoE's sub-network for `--target-lang` (tools/checkpoint/extract_task.py --verify), and that
              sub-network as a dense CTranslate2 model in float32 and int8 (tools/checkpoint/export_ctranslate2.py,
              --verify on the float32 conversion);
  4. measure  on the same test sources (the first `--sentences` of every direction into --target-lang), beam
              `--beam`, batches of `--batch` sentences, `--threads` threads, in this one process with the systems
              interleaved `--repeats` times: target tokens/s of
                token-MoE (whole)       through our decoder (the peer)
                task-MoE (whole)        through our decoder
                task-MoE (extracted)    through our decoder
                task-MoE -> CT2 fp32 / int8 through CTranslate2,
              and each one's test BLEU/chrF (sacrebleu) on those sentences. The systems take turns on each
              direction's sentences; rates and ratios come from each system's best time (every direction's fastest
              repeat, summed), with the medians of the per-repeat ratios beside them.
"Our decoder" is `--decoder trainer` (`inference.Translator` on the trainer checkpoints, as tools/translate.py) or
`reference` (`reference.ReferenceTranslator` on tools/checkpoint/export.py directories); whichever decoding those
classes implement when the benchmark runs is what is measured (the report names the class). `--dtype bf16` runs our
decoder's three systems in bf16 (`load_checkpoint(dtype=)`, as tools/translate.py --dtype); CTranslate2 has no bf16
on CPU, so its rows stay float32 / int8. `--device cuda` serves every system on the GPU (our decoders and
CTranslate2; `--ct2-device cpu` keeps CTranslate2 on the CPU); the models are initialised, extracted and exported as
on the CPU, so one `--out` serves both devices.
Written into OUT: `results.md` and `results.json` (figures, parameter counts, timings, the exact configs);
`results_bf16.md` / `.json` with --dtype bf16, `results_cuda*.md` / `.json` with --device cuda, so every precision
and device can be measured on the same models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as host_platform
import shutil
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _runner import sh as run_logged  # noqa: E402

from megatron_taskmoe.config_io import same_config  # noqa: E402
from megatron_taskmoe.fileio import write_text_atomic  # noqa: E402
from megatron_taskmoe.training.config import RunConfig  # noqa: E402

PY = sys.executable

# Widths beside the presets: "paper_width" is Kudugunta et al.'s / Pham et al.'s layer width (d 1024, FFN 4096, 16
# heads) with 2+2 layers so that it fits a CPU; "small" is a quick CPU variant; "tiny" is for the tests.
SIZES = {
    "paper_width": dict(hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16, encoder_layers=2,
                        decoder_layers=2),
    "small": dict(hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4, encoder_layers=2, decoder_layers=2),
    "tiny": dict(hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, encoder_layers=2, decoder_layers=2),
}
SYSTEMS = ("token", "task")


def sh(cmd: list[str], log: Path, threads: int) -> float:
    """`_runner.sh` with `threads` intra-op threads and warnings off."""
    return run_logged(cmd, log, {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)})


# ------------------------------------------------------------------------------------------------ 1. data
def prepare(args, out: Path) -> dict:
    info_path = out / "data_info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t = {"bitext_s": sh([PY, "examples/bible/prepare_data.py", "--output-dir", str(out / "bible"), "--languages",
                         *args.languages], logs / "prepare_data.log", args.threads)}
    t["tokenizer_s"] = sh([PY, "tools/train_tokenizer.py", "--input-dir", str(out / "bible"), "--output-prefix",
                           str(out / "spm"), "--vocab-size", str(args.vocab_size), "--sentences", "100000",
                           "--temperature", "5"], logs / "train_tokenizer.log", args.threads)
    t["preprocess_s"] = sh([PY, "tools/preprocess_data.py", "--input-dir", str(out / "bible"), "--tokenizer",
                            str(out / "spm.model"), "--output-dir", str(out / "data"), "--workers",
                            str(args.threads), "--max-len", "90", "--max-ratio", "3", "--no-progress"],
                           logs / "preprocess.log", args.threads)
    info = {"seconds": t, "languages": list(args.languages)}
    write_text_atomic(info_path, json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------------ 2. train
PRESETS = {"token": "kudugunta_token", "task": "kudugunta_target"}
"""Kudugunta et al.'s token-level and task-level (target language, both sides) systems: top-2, MoE every other
layer; only the routing differs."""


def run_config(args, system: str, out: Path) -> dict:
    side = {"layer_freq": args.layer_freq}
    overrides = {**SIZES[args.size], "max_source_positions": 96, "max_target_positions": 96,
                 "moe": {"num_experts": args.experts, "encoder": dict(side), "decoder": dict(side)}}
    return {
        "model": {"system": PRESETS[system], "size": "tiny", "overrides": overrides},
        "parallel": {"tensor": 1, "pipeline": 1, "expert": 1},
        "data": {"data_dir": str(out / "data"), "temperature": 5.0, "batching": {"max_tokens": args.max_tokens}},
        "optim": {"lr": args.lr, "warmup_steps": args.warmup_steps, "decay_style": "inverse-square-root",
                  "clip_grad": 1.0},
        "train": {"steps": args.steps, "seed": 1234, "log_interval": 25, "run_dir": str(out / system / "run"),
                  "progress_bar": False},
        "checkpoint": {"interval": 1_000_000, "keep_last": 1, "keep_best": 0},
        "eval": {"interval": 0},
    }


MODEL_FILE = "model.safetensors"
"""`--untrained`: each system's initial model, a single-file checkpoint in OUT/<system>/."""


def model_path(args, out: Path, system: str) -> Path:
    """What the serving steps read: the trainer's run directory, or with --untrained the initial model's file."""
    return out / system / (MODEL_FILE if args.untrained else "run")


def _done(record_path: Path, cfg: dict, untrained: bool) -> dict | None:
    """The record of `train`/`initialise` when it was written for `cfg` in the same mode, None otherwise."""
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    same = same_config(RunConfig, record.get("config") or {}, cfg) and bool(record.get("untrained")) == untrained
    return record if same else None


def train(args, system: str, out: Path) -> dict:
    d = out / system
    d.mkdir(parents=True, exist_ok=True)
    cfg = run_config(args, system, out)
    record_path = d / "trained.json"
    if (record := _done(record_path, cfg, untrained=False)) is not None:
        return record
    shutil.rmtree(d / "run", ignore_errors=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    seconds = sh([PY, "pretrain_mt.py", "--config", str(d / "config.yaml")], d / "train.log", args.threads)
    metrics = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m and "bleu" not in m]
    record = {"config": cfg, "train_s": round(seconds, 1), "final_train_loss": losses[-1] if losses else None}
    write_text_atomic(record_path, json.dumps(record, indent=2))
    print(f"  trained {system}: {seconds:.0f}s, final loss {record['final_train_loss']}", flush=True)
    return record


def initialise(args, system: str, out: Path) -> dict:
    """`--untrained`: the model `train` would start from (`training.initial.initial_checkpoint` on the same config),
    written atomically to OUT/<system>/model.safetensors in this process (call `compat.apply()` first)."""
    # megatron-core is imported only when a model is built: --help and the data step answer without it
    from megatron_taskmoe.checkpoint_tools.single_file import write_single_file
    from megatron_taskmoe.config_io import from_dict
    from megatron_taskmoe.training.initial import initial_checkpoint

    d = out / system
    d.mkdir(parents=True, exist_ok=True)
    cfg = run_config(args, system, out)
    record_path, path = d / "trained.json", model_path(args, out, system)
    if path.exists() and (record := _done(record_path, cfg, untrained=True)) is not None:
        return record
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.perf_counter()
    ckpt = initial_checkpoint(from_dict(RunConfig, cfg))
    write_single_file(ckpt, path, overwrite=True)
    seconds = time.perf_counter() - start
    record = {"config": cfg, "untrained": True, "init_s": round(seconds, 1), "parameters": ckpt.num_parameters(),
              "model": str(path)}
    del ckpt
    write_text_atomic(record_path, json.dumps(record, indent=2))
    print(f"  initialised {system}: {record['parameters']:,} parameters in {seconds:.0f}s -> {path}", flush=True)
    return record


# ------------------------------------------------------------------------------------------------ 3. serving forms
def serving_forms(args, out: Path) -> dict:
    """The extracted task sub-network, its CTranslate2 models, and (reference decoder) export directories."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    sub = out / "task" / f"extracted_{args.target_lang}{'.safetensors' if args.untrained else ''}"
    paths = {"extracted": sub}
    if not sub.exists():
        sh([PY, "tools/checkpoint/extract_task.py", str(model_path(args, out, "task")), str(sub), "--target-lang",
            args.target_lang, "--verify"], logs / "extract.log", args.threads)
    for quantization in ("float32", "int8"):
        ct2 = out / "task" / f"ct2_{args.target_lang}_{quantization}"
        paths[f"ct2_{quantization}"] = ct2
        if not ct2.exists():
            cmd = [PY, "tools/checkpoint/export_ctranslate2.py", str(sub), str(ct2), "--quantization", quantization]
            if quantization == "float32":
                cmd += ["--verify", "--verify-data", str(out / "bible"), "--verify-sentences", "8"]
            sh(cmd, logs / f"export_ctranslate2_{quantization}.log", args.threads)
    if args.decoder == "reference":
        for name, src in (("token", model_path(args, out, "token")), ("task", model_path(args, out, "task")),
                          ("extracted", sub)):
            exported = out / "exports" / name
            paths[f"export_{name}"] = exported
            if not exported.exists():
                exported.parent.mkdir(exist_ok=True)
                sh([PY, "tools/checkpoint/export.py", str(src), str(exported)], logs / f"export_{name}.log",
                   args.threads)
    return paths


# ------------------------------------------------------------------------------------------------ 4. measure
def test_sources(args, out: Path) -> dict[str, tuple[list[str], list[str]]]:
    from megatron_taskmoe.data.bitext import discover_bitexts, read_bitext

    pairs = {}
    for b in discover_bitexts(out / "bible", splits=["test"]):
        src, tgt = read_bitext(b)
        pairs[f"{b.src}-{b.tgt}"], pairs[f"{b.tgt}-{b.src}"] = (src, tgt), (tgt, src)
    return {d: (s[: args.sentences], t[: args.sentences]) for d, (s, t) in sorted(pairs.items())
            if d.endswith(f"-{args.target_lang}")}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def translators(args, paths: dict, out: Path) -> tuple[dict[str, Callable], dict[str, int], str]:
    """name -> translate_ids(sentences, src, tgt), the parameters each one holds, and our decoder's class."""
    from megatron_taskmoe.serving import Ct2Translator

    fns, params = {}, {}
    if args.decoder == "trainer":
        from megatron_taskmoe import compat
        from megatron_taskmoe.inference import Translator, TranslatorConfig, load_checkpoint

        compat.apply()
        config = TranslatorConfig(beam_size=args.beam, batch_size=args.batch)
        for name, path in (("token-MoE (whole)", model_path(args, out, "token")),
                           ("task-MoE (whole)", model_path(args, out, "task")),
                           ("task-MoE (extracted)", paths["extracted"])):
            loaded = load_checkpoint(path, device=args.device, dtype=args.dtype)
            fns[name], params[name] = Translator(loaded, config).translate_ids, _count(loaded.model)
        decoder = f"{Translator.__module__}.{Translator.__name__}"
    else:
        from megatron_taskmoe.reference import ReferenceTranslator, load

        for name, key in (("token-MoE (whole)", "export_token"), ("task-MoE (whole)", "export_task"),
                          ("task-MoE (extracted)", "export_extracted")):
            exported = load(paths[key])
            fns[name] = ReferenceTranslator(exported, beam_size=args.beam, batch_size=args.batch).translate_ids
            params[name] = _count(exported.model)
        decoder = f"{ReferenceTranslator.__module__}.{ReferenceTranslator.__name__}"
    for quantization, label in (("float32", "fp32"), ("int8", "int8")):
        name = f"task-MoE -> CTranslate2 {label}"
        fns[name] = Ct2Translator(paths[f"ct2_{quantization}"], beam_size=args.beam, batch_size=args.batch,
                                  device=args.ct2_device, intra_threads=args.threads,
                                  compute_type=quantization).translate_ids
        params[name] = json.loads((paths[f"ct2_{quantization}"] / "taskmoe_serving.json").read_text())["parameters"]
    return fns, params, decoder


PEER = "token-MoE (whole)"
SAME_OUTPUTS = ("task-MoE (whole)", "task-MoE (extracted)")
"""These two give identical translations, so their ratio compares equal work (the other pairs differ in output
length, which a decoder's cost per token depends on)."""


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def measure(args, fns: dict[str, Callable], tests: dict, detokenize: Callable[[list[int]], str],
            clock: Callable[[], float] = time.perf_counter) -> dict:
    """Interleaved timing of every system on the same sources, the systems taking turns on each direction's
    sentences in every repeat. Per system: seconds, target tokens and sentences per second of each repeat; the best
    time, the sum over directions of each direction's fastest repeat (`best_seconds`, as benchmarks/decode.py: a
    slowdown of the shared machine during one system's turn then counts for no system), its rates and ratios (the
    headline figures), the medians of the per-repeat ratios beside them, and BLEU/chrF of the first repeat's
    outputs."""
    from megatron_taskmoe.evaluation import score_corpus

    results = {name: {"seconds": [], "tokens": None, "scores": {}} for name in fns}
    per_direction = {name: {d: [] for d in tests} for name in fns}
    for repeat in range(args.repeats):
        outputs = {name: {} for name in fns}
        for d, (src, _) in tests.items():
            for name, fn in fns.items():
                start = clock()
                outputs[name][d] = fn(src, *d.split("-"))
                per_direction[name][d].append(clock() - start)
        for name in fns:
            seconds = sum(per_direction[name][d][repeat] for d in tests)
            results[name]["seconds"].append(seconds)
            if repeat == 0:
                results[name]["tokens"] = sum(len(h) for hyps in outputs[name].values() for h in hyps)
                text = {d: [detokenize(h) for h in hyps] for d, hyps in outputs[name].items()}
                results[name]["scores"] = {d: score_corpus(text[d], tests[d][1]).__dict__ for d in tests}
                results[name]["sample"] = {d: text[d][:2] for d in tests}
            print(f"  repeat {repeat + 1}/{args.repeats} {name:32s} {seconds:8.1f}s "
                  f"{results[name]['tokens'] / seconds:8.1f} target tokens/s", flush=True)
    sentences = sum(len(src) for src, _ in tests.values())
    for name, r in results.items():
        r["tokens_per_s"] = [r["tokens"] / s for s in r["seconds"]]
        r["sentences_per_s"] = [sentences / s for s in r["seconds"]]
        r["best_seconds"] = sum(min(times) for times in per_direction[name].values())
        r["best_tokens_per_s"] = r["tokens"] / r["best_seconds"]
        r["best_sentences_per_s"] = sentences / r["best_seconds"]
        r["ratio_to_token_moe"] = r["best_tokens_per_s"] / results[PEER]["best_tokens_per_s"]
        r["median_ratio_to_token_moe"] = _median_ratio(r["tokens_per_s"], results[PEER]["tokens_per_s"])
        r["bleu"] = statistics.mean(s["bleu"] for s in r["scores"].values())
        r["chrf"] = statistics.mean(s["chrf"] for s in r["scores"].values())
    whole, extracted = SAME_OUTPUTS
    if whole in results and extracted in results:
        results[extracted]["ratio_to_task_moe_whole"] = (results[extracted]["best_tokens_per_s"]
                                                         / results[whole]["best_tokens_per_s"])
    for name in [n for n in results if "CTranslate2" in n]:
        results[name]["ratio_to_extracted_ours"] = (results[name]["best_tokens_per_s"]
                                                    / results[extracted]["best_tokens_per_s"])
    return results


UNTRAINED_NOTE = ("UNTRAINED models (initialised as pretrain_mt.py at step 0, not trained): throughput only; BLEU "
                  "and chrF are not meaningful and the outputs run to the length limit")
"""What results.md and results.json say of an `--untrained` run."""


def markdown(args, results: dict, params: dict, decoder: str, load: str, directions: list[str]) -> str:
    title = f"# Serving a token-MoE and a task-MoE (Kudugunta et al. 2021), size `{args.size}`"
    training = (f"{args.steps} training steps of <= {args.max_tokens} tokens" if not args.untrained else
                "untrained: BLEU/chrF below are not meaningful")
    lines = [title + (", UNTRAINED models (throughput only)" if args.untrained else ""), "",
             *([f"**{UNTRAINED_NOTE}.**", ""] if args.untrained else []),
             f"{SIZES[args.size]}, {args.experts} experts top-2 every {args.layer_freq} layer(s); {training}; "
             f"test sources: the first {args.sentences} of "
             f"{', '.join(directions)}; beam {args.beam}, batches of {args.batch}, {where(args)}; "
             f"{args.repeats} interleaved repeats. Our decoder: `{decoder}` in {args.dtype}. Load at start: {load}.",
             "", "Rates and ratios from the best time (each direction's fastest repeat, summed); the median of the "
             "per-repeat ratios beside them.", "",
             "| system | parameters served | target tokens/s | sentences/s | x token-MoE | x token-MoE (median) | BLEU "
             "| chrF |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {params.get(name, 0):,} | {r['best_tokens_per_s']:.1f} | "
                     f"{r['best_sentences_per_s']:.2f} | {r['ratio_to_token_moe']:.2f} | "
                     f"{r['median_ratio_to_token_moe']:.2f} | {r['bleu']:.1f} | {r['chrf']:.1f} |")
    lines.append("")
    whole, extracted = SAME_OUTPUTS
    if "ratio_to_task_moe_whole" in results.get(extracted, {}):
        lines.append(f"- {extracted}: {results[extracted]['ratio_to_task_moe_whole']:.2f}x {whole} (the same "
                     "translations, so equal work)")
    for name in [n for n in results if "CTranslate2" in n]:
        lines.append(f"- {name}: {results[name]['ratio_to_extracted_ours']:.2f}x the extracted sub-network through "
                     "our decoder")
    return "\n".join(lines) + "\n"


def where(args) -> str:
    """The devices the systems ran on, for the report."""
    if args.device == "cpu" and args.ct2_device == "cpu":
        return f"{args.threads} thread(s)"
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"
    ours = gpu if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    ct2 = gpu if args.ct2_device == "cuda" else f"CPU, {args.threads} thread(s)"
    return f"our decoder on {ours}, CTranslate2 on {ct2}"


def results_stem(args) -> str:
    """results[_cuda][_bf16]: one report per device and precision in one --out."""
    return "_".join(["results"] + (["cuda"] if "cuda" in (args.device, args.ct2_device) else [])
                    + ([args.dtype] if args.dtype != "fp32" else []))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (reused: finished steps are skipped)")
    p.add_argument("--size", choices=sorted(SIZES), default="paper_width")
    p.add_argument("--experts", type=int, default=32, help="experts per MoE layer (Kudugunta et al.: 32 -> 1.9x)")
    p.add_argument("--layer-freq", type=int, default=2, help="an MoE FFN every this many layers (GShard: 2)")
    p.add_argument("--untrained", action="store_true", help="do not train: serve each model as pretrain_mt.py "
                   "initialises it (throughput only; BLEU/chrF not meaningful; needs no training memory)")
    p.add_argument("--steps", type=int, default=400, help="training steps of each model (unused with --untrained)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per training batch (unused with --untrained)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (unused with --untrained)")
    p.add_argument("--warmup-steps", type=int, default=100, help="learning-rate warmup steps (unused with --untrained)")
    p.add_argument("--languages", nargs="+", default=["fr", "de"], help="languages paired with English")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--target-lang", default="en", help="the served target language (its directions are measured)")
    p.add_argument("--sentences", type=int, default=64, help="test sources per direction")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every system and of each training")
    p.add_argument("--jobs", type=int, default=1, help="models trained at a time (2: both at once, each with "
                   "--threads threads; unused with --untrained)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timing repeats")
    p.add_argument("--decoder", choices=("trainer", "reference"), default="trainer",
                   help="our decoder: inference.Translator on checkpoints or ReferenceTranslator on exports")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="precision of our decoder (--decoder trainer); CTranslate2 stays float32 / int8")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where our decoder serves (and CTranslate2, unless --ct2-device)")
    p.add_argument("--ct2-device", choices=("cpu", "cuda"), default=None,
                   help="where CTranslate2 serves (default: --device)")
    args = p.parse_args(argv)
    args.ct2_device = args.ct2_device or args.device
    if args.device != "cpu" and args.decoder != "trainer":
        p.error(f"--device {args.device} needs --decoder trainer (the reference decoder serves on the CPU)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here (use --device cpu)")
    if args.ct2_device == "cuda":
        import ctranslate2

        if ctranslate2.get_cuda_device_count() < 1:
            p.error("--ct2-device cuda: CTranslate2 sees no CUDA device (its CUDA 12 libraries missing?); "
                    "use --ct2-device cpu")
    if args.dtype != "fp32" and args.decoder != "trainer":
        p.error(f"--dtype {args.dtype} needs --decoder trainer (the reference decoder runs its export's dtype)")
    for name in ("experts", "steps", "sentences", "beam", "batch", "threads", "repeats", "layer_freq", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.target_lang != "en" and args.target_lang not in args.languages:
        p.error(f"--target-lang {args.target_lang} is not English nor one of --languages {args.languages}")
    for system in SYSTEMS:  # one --out per mode: the serving forms of one mode would be reused by the other
        record = args.out / system / "trained.json"
        if record.is_file() and bool(json.loads(record.read_text()).get("untrained")) != args.untrained:
            held = "untrained" if not args.untrained else "trained"
            p.error(f"--out {args.out} holds {held} models ({record}); use another --out "
                    f"{'with' if args.untrained else 'without'} --untrained")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load = f"{os.getloadavg()[0]:.1f} (1-min loadavg, {os.cpu_count()} CPUs, {host_platform.processor() or 'cpu'})"
    print(f"== data ({', '.join(args.languages)} <-> en)", flush=True)
    data = prepare(args, out)
    if args.untrained:
        import torch

        from megatron_taskmoe import compat

        torch.set_num_threads(args.threads)
        print(f"== initialise token-MoE and task-MoE ({args.size}, {args.experts} experts; untrained)", flush=True)
        warnings.filterwarnings("ignore")
        logging.getLogger("megatron").setLevel(logging.ERROR)
        compat.apply()
        trained = {s: initialise(args, s, out) for s in SYSTEMS}
    else:
        print(f"== train token-MoE and task-MoE ({args.size}, {args.experts} experts, {args.steps} steps)",
              flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            trained = dict(zip(SYSTEMS, pool.map(lambda s: train(args, s, out), SYSTEMS)))
    print(f"== extract the task-MoE's sub-network into {args.target_lang}; CTranslate2 float32 / int8", flush=True)
    paths = serving_forms(args, out)

    import sentencepiece as spm
    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    tests = test_sources(args, out)
    fns, params, decoder = translators(args, paths, out)
    print(f"== measure ({decoder}; load {load})", flush=True)
    results = measure(args, fns, tests, sp.decode)
    md = markdown(args, results, params, decoder, load, sorted(tests))
    doc = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "untrained": args.untrained, **({"note": UNTRAINED_NOTE} if args.untrained else {}), "data": data,
           "trained": trained, "parameters": params, "decoder": decoder, "load_at_start": load,
           "load_at_end": os.getloadavg()[0], "results": results}
    stem = results_stem(args)
    write_text_atomic(out / f"{stem}.json", json.dumps(doc, indent=2))
    write_text_atomic(out / f"{stem}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
