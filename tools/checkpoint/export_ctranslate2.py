#!/usr/bin/env python
"""Export a dense model, or the sub-network that serves some directions of a task-routed MoE model, to CTranslate2.

    # Kudugunta et al.'s serving: the experts one target language uses, as a dense Transformer, int8
    python tools/checkpoint/export_ctranslate2.py RUN/checkpoints ct2_de --target-lang de --quantization int8 --verify
    # one direction of a model routed by language pair, checked on real test sentences
    python tools/checkpoint/export_ctranslate2.py EXPORT_DIR ct2_de_en --task de-en --verify \
        --verify-data data/bible --verify-split test --verify-sentences 200

SOURCE is a standalone export directory (tools/checkpoint/export.py), a trainer checkpoint of any layout (a step
directory, its checkpoints root or the run directory; an extracted sub-network from extract_task.py is one) or a
.safetensors file from convert.py. Without --task/--target-lang every direction of the model is served, which works
for dense models and for models whose directions share their experts (e.g. an extracted target language).

In a task-routed MoE layer every token of a direction uses the same top-k experts with the same gate weights, so the
layer is one dense FFN: the experts' fc1 rows concatenated and their fc2 columns scaled by the gate weights.
Layers that cannot be written that way are refused with their names, and nothing is written: experts routed by
token, sentence or token+task, task adapters, token dropping (capacity_factor), and directions whose gates differ.

The output directory holds CTranslate2's model (model.bin, config.json, shared_vocabulary.json), the sentencepiece
tokenizer.model and taskmoe_serving.json (served directions and their <2xx> source prefix, gates per layer). Serve it
with megatron_taskmoe.serving.Ct2Translator, or with CTranslate2 directly, keeping pad, bos, unk and the <2xx> tags
out of the outputs as our decoders do (Ct2Translator does):

    translator = ctranslate2.Translator("ct2_de")
    translator.translate_batch([["<2de>", *sp.encode("Hello", out_type=str)]],  # eos is appended by CTranslate2
                               disable_unk=True, suppress_sequences=[["<pad>"], ["<s>"], ["<2de>"], ["<2en>"]])

--verify runs the reference model (the MoE model itself) and a float32 CTranslate2 model on a test set (random
piece sequences, or --verify-data's sentences): greedy outputs, with pad, bos, unk and the <2xx> tags banned on both
sides, must be identical (a difference only at a near-tie, log-probability gap <= --tolerance, is reported as a
tie) and teacher-forced token log-probabilities within --tolerance; a quantized export is compared too and its
agreement reported. A failed check exits 1 and writes nothing. Output is written to a .partial. sibling and renamed
when complete; bad input exits 2 naming the file or option, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# This package's imports sit inside the functions, where they are used: they import megatron-core, which is
# slow, so the options are checked first.

QUANTIZATIONS = ("float32", "int8", "int8_float32", "int16", "float16", "bfloat16")  # CTranslate2's weight types


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="export directory, trainer checkpoint (step dir, checkpoints root or run dir) or "
                   "a .safetensors file written by convert.py")
    p.add_argument("output", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--task", action="append", default=[], metavar="NAME",
                   help="serve this task (a task name or a direction such as de-en); repeatable")
    p.add_argument("--target-lang", action="append", default=[], metavar="LANG",
                   help="serve every direction into LANG; repeatable (with --task: both filters apply)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="float32",
                   help="CTranslate2 weight type of the written model (default float32)")
    p.add_argument("--verify", action="store_true", help="check CTranslate2 against the reference model before the "
                   "output appears (see above)")
    p.add_argument("--verify-data", type=Path, default=None, metavar="DIR",
                   help="raw bitext directory for --verify (default: random piece sequences)")
    p.add_argument("--verify-split", default="test", help="split of --verify-data (default test)")
    p.add_argument("--verify-sentences", type=int, default=32,
                   help="sentences per served direction for --verify (default 32)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest token log-probability difference --verify accepts (default 1e-3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
    from megatron_taskmoe.checkpoint_tools.outputs import check_output

    if args.verify_sentences < 1:
        raise CheckpointToolError(f"--verify-sentences {args.verify_sentences} must be >= 1")
    if not args.tolerance >= 0:
        raise CheckpointToolError(f"--tolerance {args.tolerance} must be >= 0")
    if args.verify_data is not None and not args.verify_data.is_dir():
        raise CheckpointToolError(f"--verify-data {args.verify_data}: no such directory")
    output = check_output(args.output, args.overwrite)
    try:
        import ctranslate2  # noqa: F401  (the optional dependency, checked before any work)
    except ImportError:
        raise CheckpointToolError("the ctranslate2 package is not installed: pip install 'ctranslate2>=4,<5' "
                                  "(or pip install -e '.[serve]')") from None
    from megatron_taskmoe.serving.export import ExportVerificationError, export_ctranslate2

    try:
        summary = export_ctranslate2(
            args.source, output, tasks=args.task, target_langs=args.target_lang, quantization=args.quantization,
            overwrite=args.overwrite, verify=args.verify, verify_data=args.verify_data,
            verify_split=args.verify_split, verify_sentences=args.verify_sentences, tolerance=args.tolerance)
    except ExportVerificationError as e:
        print(f"export_ctranslate2.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from megatron_taskmoe.checkpoint_tools.cli import run

    sys.exit(run(main, "export_ctranslate2.py"))
