#!/usr/bin/env python
"""Translate raw text with a trained checkpoint: one sentence per line in, one detokenized translation per line out.

  python tools/translate.py --checkpoint RUN/checkpoints --source-lang de --target-lang en < input.de > output.en
  python tools/translate.py --checkpoint RUN --source-lang en --target-lang fr --input test.en --beam 5

--checkpoint takes a checkpoint directory (step_XXXXXXXX), a checkpoint root (its latest complete checkpoint), a
run directory or a single .safetensors file (convert.py --single-file, extract_task.py). The model is loaded into
this one process whatever parallel layout it was trained with. Output is in input order on stdout; messages go to
stderr. Exit status 2: bad option, checkpoint or input (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

# Imports of torch, megatron-core and this package sit inside the functions: `--help` and option errors answer
# before their (slow) import.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory, checkpoint root, run dir or .safetensors file")
    p.add_argument("--source-lang", required=True)
    p.add_argument("--target-lang", required=True)
    p.add_argument("--input", type=Path, default=None, help="UTF-8 text, one sentence per line (default: stdin)")
    p.add_argument("--beam", type=int, default=4, help="beam size (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="hypotheses ranked by score / length**A")
    p.add_argument("--max-len-a", type=float, default=1.2, help="max output length = A * source length + B")
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--min-len", type=int, default=0, help="minimum output length in tokens (before eos)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per decoding batch")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="precision to decode in, the weights cast to it (default: the run's model.params_dtype, fp32 "
                        "unless set); bf16 is faster on GPUs and on CPUs with AMX/AVX512-BF16, and may change a few "
                        "translations")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="sentencepiece model (default: the checkpoint's copy; its sha256 is checked)")
    p.add_argument("--verbose", action="store_true", help="log loading details to stderr")
    return p.parse_args(argv)


def read_input(path: Path | None) -> list[str]:
    from megatron_taskmoe.data.bitext import DataError, decode_lines

    if path is None:
        return decode_lines(sys.stdin.buffer.read(), "<stdin>")
    try:
        return decode_lines(path.read_bytes(), str(path))
    except OSError as e:
        raise DataError(f"{path}: cannot read input: {e.strerror}") from None


def quiet_megatron(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        warnings.filterwarnings("ignore")
        logging.getLogger("megatron").setLevel(logging.ERROR)  # layer-spec notices on every model build


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_megatron(args.verbose)
    from megatron_taskmoe import compat
    from megatron_taskmoe.data.bitext import DataError
    from megatron_taskmoe.inference import (InferenceError, Translator, TranslatorConfig, check_direction,
                                            checkpoint_record, load_checkpoint)

    try:
        config = TranslatorConfig(beam_size=args.beam, length_penalty=args.length_penalty, max_len_a=args.max_len_a,
                                  max_len_b=args.max_len_b, min_len=args.min_len,
                                  batch_size=args.batch_size)
    except ValueError as e:
        print(f"translate.py: error: {e}", file=sys.stderr)
        return 2
    try:
        where, meta = checkpoint_record(args.checkpoint)  # fail on a wrong path or direction before the slow load
        check_direction(meta, args.source_lang, args.target_lang, where=where)
        lines = read_input(args.input)
        compat.apply()  # megatron-core is imported here, once the options, checkpoint and input have been checked
        loaded = load_checkpoint(where, device=args.device, tokenizer=args.tokenizer, dtype=args.dtype)
        outputs = Translator(loaded, config).translate(lines, args.source_lang, args.target_lang)
    except (InferenceError, DataError) as e:
        print(f"translate.py: error: {e}", file=sys.stderr)
        return 2
    out = sys.stdout
    for line in outputs:
        out.write(line.replace("\n", " ") + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
