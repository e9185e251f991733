#!/usr/bin/env python
"""Whole-process preprocessing speed: tools/preprocess_data.py against sentencepiece's own encoding (the ceiling)
and Megatron-LM's tools/preprocess_data.py, each run as its own process on the same sentences.

  (ceiling)      benchmarks/sentencepiece_ceiling.py: Python start-up, reading the files and encoding every line of
                 them with sentencepiece, nothing else; with W threads (`sp.encode(lines, num_threads=W)`) and with
                 W forked processes; the faster of the two is the ceiling;
  (megatron-lm)  Megatron-LM's tools/preprocess_data.py (from the checkout given by --megatron-lm-dir, run with
                 this interpreter) with --workers W, on the same sentences written as JSONL (`{"text": sentence}`
                 per line, one document per sentence, SentencePieceTokenizer with the same model);
  (ours)         tools/preprocess_data.py --workers W: reading and checking, encoding, filters, both directions,
                 .bin/.idx and manifest.json.
Every time is a whole process measured from outside (wall clock from start to exit, and CPU seconds of the process
and its children); runs are interleaved, repeated --repeats times, and summarized by medians, the ratios as medians
of the per-repeat ratios. Sentences/s count every line of every input file (both sides of every pair). --copies N
repeats every input file N times (a bigger, steadier measurement on a small corpus).

  python benchmarks/preprocess.py --bitext-dir demo_output/bible --tokenizer demo_output/spm.model --copies 4 \\
      --megatron-lm-dir /path/to/Megatron-LM

Megatron-LM's tool imports megatron.training, which needs `six` and `triton` importable besides megatron-core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_taskmoe.data.bitext import discover_bitexts

ROOT = Path(__file__).resolve().parents[1]
CEILING = ROOT / "benchmarks" / "sentencepiece_ceiling.py"
OURS = ROOT / "tools" / "preprocess_data.py"


def bitext_inputs(bitext_dir: Path) -> list[Path]:
    """The bitext sides of the directory (every peer reads these); aligned files only (what the ceiling reads)."""
    bitexts = discover_bitexts(bitext_dir)
    other = [str(b.paths[0]) for b in bitexts if b.kind != "aligned"]
    if other:
        raise RuntimeError(f"only aligned bitext files are supported here, not {', '.join(other)}")
    return sorted(p for b in bitexts for p in b.paths)


def make_corpus(bitext_dir: Path, copies: int, work: Path) -> Path:
    if copies == 1:
        return bitext_dir
    corpus = work / "corpus"
    corpus.mkdir()
    for path in bitext_inputs(bitext_dir):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            data += b"\n"
        (corpus / path.name).write_bytes(data * copies)
    return corpus


def write_jsonl(corpus: Path, path: Path) -> int:
    """Every line of every input file as `{"text": line}`; returns the number of lines."""
    n = 0
    with open(path, "w", encoding="utf-8") as out:
        for f in bitext_inputs(corpus):
            lines = f.read_text(encoding="utf-8").split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            out.writelines(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines)
            n += len(lines)
    return n


def run(cmd: list[str], label: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its children, stdout) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"{label} failed with exit code {result.returncode}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bitext-dir", required=True, type=Path, help="aligned bitext (examples/bible/prepare_data.py)")
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--workers", type=int, default=2, help="processes/threads of every peer")
    p.add_argument("--copies", type=int, default=1, help="repeat every input file this many times")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--megatron-lm-dir", type=Path, default=None,
                   help="a Megatron-LM checkout (e.g. tag core_v0.16.1) whose tools/preprocess_data.py to run")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch space (default: a temporary directory)")
    args = p.parse_args(argv)
    python = sys.executable
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-", dir=args.work_dir))
    try:
        corpus = make_corpus(args.bitext_dir, args.copies, work)
        files = bitext_inputs(corpus)
        sentences = sum(f.read_bytes().count(b"\n") for f in files)
        print(f"{len(files)} files, {sentences} sentences ({args.copies} copies of {args.bitext_dir}), "
              f"{args.workers} workers, cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}", flush=True)
        peers = {
            "ceiling: sentencepiece, threads": [python, str(CEILING), "--input-dir", str(corpus), "--tokenizer",
                                                str(args.tokenizer), "--workers", str(args.workers)],
            "ceiling: sentencepiece, processes": [python, str(CEILING), "--input-dir", str(corpus), "--tokenizer",
                                                  str(args.tokenizer), "--workers", str(args.workers),
                                                  "--mode", "processes"],
            "ours: tools/preprocess_data.py": [python, str(OURS), "--input-dir", str(corpus), "--tokenizer",
                                               str(args.tokenizer), "--output-dir", str(work / "ours"),
                                               "--workers", str(args.workers), "--no-progress"],
        }
        outputs = {"ours: tools/preprocess_data.py": work / "ours"}
        if args.megatron_lm_dir is None:
            print("Megatron-LM: not measured (no --megatron-lm-dir given: pass a checkout of NVIDIA/Megatron-LM, "
                  "e.g. tag core_v0.16.1)", flush=True)
        else:
            tool = args.megatron_lm_dir / "tools" / "preprocess_data.py"
            if not tool.is_file():
                p.error(f"{tool}: not found (--megatron-lm-dir must be a Megatron-LM checkout)")
            jsonl = work / "sentences.jsonl"
            assert write_jsonl(corpus, jsonl) == sentences
            (work / "megatron").mkdir()
            peers["Megatron-LM tools/preprocess_data.py"] = [
                python, str(tool), "--input", str(jsonl), "--output-prefix", str(work / "megatron" / "bible"),
                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(args.tokenizer),
                "--workers", str(args.workers), "--log-interval", str(10 ** 9)]
            outputs["Megatron-LM tools/preprocess_data.py"] = work / "megatron"
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in peers}
        stdout = {}
        for repeat in range(args.repeats):
            for name, cmd in peers.items():
                if name in outputs:
                    shutil.rmtree(outputs[name], ignore_errors=True)
                    outputs[name].mkdir()
                wall, cpu, stdout[name] = run(cmd, name)
                times[name].append((wall, cpu))
                print(f"  repeat {repeat + 1}: {name:40} {wall:8.2f} s  CPU {cpu:8.2f} s  "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
        report(times, sentences, args.workers)
        check_work(stdout, outputs)
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except RuntimeError as e:
        print(f"preprocess.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(times: dict, sentences: int, workers: int) -> None:
    ceilings = [name for name in times if name.startswith("ceiling")]
    ours = "ours: tools/preprocess_data.py"
    ceiling_wall = [min(times[c][r][0] for c in ceilings) for r in range(len(times[ours]))]
    print(f"\n{'pipeline':40} {'wall s':>8} {'CPU s':>8} {'sent/s':>10} {'ceiling/x':>9} {'x/ours':>8}")
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        of_ceiling = statistics.median(c / w for c, (w, _) in zip(ceiling_wall, runs))
        vs_ours = statistics.median(w / o for (w, _), (o, _) in zip(runs, times[ours]))
        print(f"{name:40} {wall:8.2f} {cpu:8.2f} {sentences / wall:10,.0f} {of_ceiling:9.2f} {vs_ours:8.2f}")
    print(f"ceiling/x: the per-repeat faster ceiling's wall time over the pipeline's (ours: the share of the ceiling "
          f"reached, goal >= 0.8); x/ours: the pipeline's wall time over ours (Megatron-LM: how many times faster "
          f"ours is, goal >= 4); {workers} workers each")


def check_work(stdout: dict, outputs: dict) -> None:
    """The peers encoded the same sentences into the same pieces (ours: minus the pairs its filters removed)."""
    for name, out in stdout.items():
        if name.startswith("ceiling"):
            print(f"{name}: {out.strip()}")
    ours = json.loads((outputs["ours: tools/preprocess_data.py"] / "manifest.json").read_text())
    kept = sum(d["splits"][s]["src_tokens"] + d["splits"][s]["tgt_tokens"]
               for name, d in ours["directions"].items() for s in d["splits"] if d["src"] < d["tgt"])
    removed = sum(sum(r.values()) for r in ours["filters"]["removed"].values())
    print(f"ours: {kept} pieces in the kept pairs ({removed} pairs removed by the filters)")
    megatron = outputs.get("Megatron-LM tools/preprocess_data.py")
    if megatron is not None:
        bins = sorted(megatron.glob("*.bin"))
        pieces = sum(b.stat().st_size for b in bins) // np.dtype(np.uint16 if ours["dtype"] == "uint16"
                                                                   else np.int32).itemsize
        print(f"Megatron-LM: {pieces} pieces in {', '.join(b.name for b in bins)}")


if __name__ == "__main__":
    sys.exit(main())
