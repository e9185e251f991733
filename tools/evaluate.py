#!/usr/bin/env python
"""Per-task BLEU and chrF of trained checkpoints on raw test text, as a table shaped like Pham et al.'s Table 2.

  python tools/evaluate.py --checkpoint RUN_A --system "task-MoE" --checkpoint RUN_B --system dense \\
      --data data/bible --split test --format markdown --output results.md

--data is a raw bitext directory (`{split}.{a}-{b}.{a}` / `.{b}` as examples/bible/prepare_data.py writes, or
TSV/JSONL); each pair is scored in both directions (a-b and b-a), every direction the checkpoint was trained on
unless --directions picks some. Sources are translated by `inference.Translator` and scored with sacrebleu against
the raw references (BLEU 13a, chrF). One row per --checkpoint (labelled by --system, default the run directory's
name); columns are directions, then the xx-en / en-xx / overall averages.

--routing-json / --routing-png (one checkpoint): per-task expert load of every MoE layer and adapter choice,
teacher-forced on the same test pairs, as JSON and as a heatmap picture.

Exit status 2: bad option, checkpoint or data (one line on stderr naming it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from translate import quiet_megatron  # noqa: E402

from megatron_taskmoe.fileio import write_text_atomic  # noqa: E402

# Imports of torch, megatron-core and this package sit inside the functions: `--help` and option errors answer
# before their (slow) import.

FORMATS = ("markdown", "csv", "json")
METRICS = ("bleu", "chrf")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, action="append",
                   help="checkpoint directory, checkpoint root or run dir (repeat for more rows)")
    p.add_argument("--system", action="append", default=None,
                   help="row label of the corresponding --checkpoint (default: its run directory's name)")
    p.add_argument("--data", required=True, type=Path, help="raw bitext directory")
    p.add_argument("--split", default="test")
    p.add_argument("--directions", nargs="+", default=None, help="e.g. de-en en-de (default: all trained ones)")
    p.add_argument("--max-sentences", type=int, default=0, help="score only the first N pairs per direction; 0: all")
    p.add_argument("--format", choices=FORMATS, default="markdown")
    p.add_argument("--metric", choices=(*METRICS, "both"), default="both")
    p.add_argument("--bleu-tokenize", default=None,
                   help="sacrebleu tokenizer for every direction (e.g. flores200); default: by target language "
                        "(13a; zh; ja-mecab / ko-mecab where installed)")
    p.add_argument("--output", type=Path, default=None, help="write the table here (default: stdout)")
    p.add_argument("--hypotheses-dir", type=Path, default=None,
                   help="also write each system's translations as DIR/SYSTEM.SPLIT.DIRECTION.txt")
    p.add_argument("--routing-json", type=Path, default=None, help="per-task routing statistics (one checkpoint)")
    p.add_argument("--routing-png", type=Path, default=None, help="routing heatmap picture (one checkpoint)")
    p.add_argument("--beam", type=int, default=4, help="beam size (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--max-len-a", type=float, default=1.2)
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--min-len", type=int, default=0, help="minimum output length in tokens (before eos)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="precision to decode in (as tools/translate.py --dtype; default: the run's model.params_dtype)")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def system_name(checkpoint: Path, info_path: Path) -> str:
    """The run directory's name (RUN/checkpoints/step_X -> RUN) and the step."""
    run = info_path.parent.parent if info_path.parent.name == "checkpoints" else info_path.parent
    step = info_path.name.replace("step_", "").lstrip("0") or "0"
    return f"{run.name}@{step}"


def load_test_pairs(data: Path, split: str) -> dict[str, tuple[list[str], list[str]]]:
    """{direction: (sources, references)} for both directions of every bitext of `split`."""
    from megatron_taskmoe.data.bitext import DataError, discover_bitexts, read_bitext

    try:
        bitexts = discover_bitexts(data, splits=[split])
    except DataError as e:
        if "no bitext files found" in str(e):
            raise DataError(f"{data}: no {split!r} bitext files (expected names like {split}.de-en.de + "
                            f"{split}.de-en.en, {split}.de-en.tsv or {split}.de-en.jsonl)") from None
        raise
    pairs = {}
    for b in bitexts:
        src, tgt = read_bitext(b)
        pairs[f"{b.src}-{b.tgt}"] = (src, tgt)
        pairs[f"{b.tgt}-{b.src}"] = (tgt, src)
    return pairs


def choose_directions(requested, available: dict, trained: list[str], where: str) -> list[str]:
    from megatron_taskmoe.data.bitext import DataError

    if requested is None:
        chosen = [d for d in sorted(available) if d in trained]
        if not chosen:
            raise DataError(f"{where}: none of the test directions ({', '.join(sorted(available))}) was trained "
                            f"(trained: {', '.join(trained)})")
        return chosen
    for d in requested:
        if not re.fullmatch(r"[^-\s]+-[^-\s]+", d):
            raise DataError(f"--directions {d!r}: expected src-tgt, e.g. de-en")
        if d not in available:
            raise DataError(f"--directions {d}: no test text for it (available: {', '.join(sorted(available))})")
        if d not in trained:
            raise DataError(f"--directions {d}: {where} was not trained on it (trained: {', '.join(trained)})")
    return list(requested)




def render(tables: dict, details: dict, fmt: str) -> str:
    """One table per metric: markdown sections, CSV with a leading `metric` column, or one JSON document."""
    if fmt == "json":
        doc = {metric: json.loads(table.to_json()) for metric, table in tables.items()}
        return json.dumps({**{m: d["rows"] for m, d in doc.items()}, "details": details,
                           "signatures": {m: d["signatures"] for m, d in doc.items()}}, indent=2) + "\n"
    if fmt == "csv":
        out = []
        for metric, table in tables.items():
            lines = table.to_csv().splitlines()
            if not out:
                out.append("metric," + lines[0])
            out.extend(f"{metric},{line}" for line in lines[1:])
        return "\n".join(out) + "\n"
    titles = {"bleu": "BLEU", "chrf": "chrF"}
    return "\n".join(f"### {titles[m]}\n\n{t.to_markdown()}" for m, t in tables.items())


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_megatron(args.verbose)

    def fail(message: str) -> int:
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        return 2

    if args.system is not None and len(args.system) != len(args.checkpoint):
        return fail(f"{len(args.system)} --system labels for {len(args.checkpoint)} --checkpoint options")
    if (args.routing_json or args.routing_png) and len(args.checkpoint) != 1:
        return fail("--routing-json/--routing-png need exactly one --checkpoint")
    if args.max_sentences < 0:
        return fail(f"--max-sentences must be >= 0, got {args.max_sentences}")

    from megatron_taskmoe import compat
    from megatron_taskmoe.data.bitext import DataError
    from megatron_taskmoe.evaluation import ResultTable, score_corpus
    from megatron_taskmoe.inference import InferenceError, Translator, TranslatorConfig, find_checkpoint, \
        load_checkpoint

    compat.apply()

    try:
        config = TranslatorConfig(beam_size=args.beam, length_penalty=args.length_penalty, max_len_a=args.max_len_a,
                                  max_len_b=args.max_len_b, min_len=args.min_len,
                                  batch_size=args.batch_size)
    except ValueError as e:
        return fail(str(e))
    metrics = METRICS if args.metric == "both" else (args.metric,)
    tables = {m: ResultTable(metric=m) for m in metrics}
    details: dict[str, dict] = {}
    try:
        pairs = load_test_pairs(args.data, args.split)
        infos = [find_checkpoint(c) for c in args.checkpoint]
        names = args.system or [system_name(c, i.path) for c, i in zip(args.checkpoint, infos)]
        if len(set(names)) != len(names):
            return fail(f"two rows would be named alike ({', '.join(names)}): give --system labels")
        plans = []
        for info in infos:  # check every checkpoint's directions before the first slow load
            trained = sorted(info.meta.get("task_map", {}).get("direction_to_task", {}))
            plans.append(choose_directions(args.directions, pairs, trained, str(info.path)))
        for info, name, directions in zip(infos, names, plans):
            loaded = load_checkpoint(info.path, device=args.device, dtype=args.dtype)
            translator = Translator(loaded, config)
            scores = {}
            for d in directions:
                src_lang, tgt_lang = d.split("-")
                sources, refs = pairs[d]
                if args.max_sentences:
                    sources, refs = sources[: args.max_sentences], refs[: args.max_sentences]
                start = time.perf_counter()
                hyps = translator.translate(sources, src_lang, tgt_lang)
                seconds = time.perf_counter() - start
                scores[d] = score_corpus(hyps, refs, tgt_lang=tgt_lang, tokenize=args.bleu_tokenize)
                print(f"{name} {d}: BLEU {scores[d].bleu:.2f} chrF {scores[d].chrf:.2f} ({len(hyps)} sentences, "
                      f"{seconds:.1f}s)", file=sys.stderr)
                if args.hypotheses_dir:
                    safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", name)
                    write_text_atomic(args.hypotheses_dir / f"{safe}.{args.split}.{d}.txt",
                                 "".join(h.replace("\n", " ") + "\n" for h in hyps))
            for table in tables.values():
                table.add(name, scores)
            details[name] = {"checkpoint": str(info.path), "step": info.step, "dtype": loaded.dtype,
                             **{d: {"bleu": s.bleu, "chrf": s.chrf, "sentences": s.sentences,
                                    "signature": s.signature, "chrf_signature": s.chrf_signature}
                                for d, s in scores.items()}}
            if args.routing_json or args.routing_png:
                write_routing(args, translator, {d: pairs[d] for d in directions})
    except (InferenceError, DataError) as e:
        return fail(str(e))
    for table in tables.values():  # also in the markdown and JSON documents; CSV has only the scores
        for line in table.signature_lines():
            print(line, file=sys.stderr)
    text = render(tables, details, args.format)
    if args.output:
        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def write_routing(args, translator, pairs) -> None:
    from megatron_taskmoe.analysis.routing import bitext_batches, collect_routing_stats, plot_routing

    if args.max_sentences:
        pairs = {d: (s[: args.max_sentences], r[: args.max_sentences]) for d, (s, r) in pairs.items()}
    stats = collect_routing_stats(translator.loaded.model, bitext_batches(translator, pairs),
                                  task_names=translator.loaded.task_map["tasks"])
    if args.routing_json:
        write_text_atomic(args.routing_json, stats.to_json())
    if args.routing_png:
        plot_routing(stats, args.routing_png)


if __name__ == "__main__":
    sys.exit(main())
