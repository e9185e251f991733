#!/usr/bin/env bash
# The `make demo` job. Data part: real Bible bitext -> joint tokenizer -> indexed datasets -> sampling summary.
# Usage: bash examples/demo.sh OUTPUT_DIR   (uses the `python` on PATH; `make demo` puts .venv/bin first)
set -euo pipefail
OUT="${1:?usage: examples/demo.sh OUTPUT_DIR}"
cd "$(dirname "$0")/.."
LANGS="${DEMO_LANGUAGES:-fr es de ru tr}"
WORKERS="${DEMO_WORKERS:-$(nproc)}"
mkdir -p "$OUT"

echo "== 1/4 prepare Bible bitext (en <-> ${LANGS})"
python examples/bible/prepare_data.py --output-dir "$OUT/bible" --languages $LANGS

echo "== 2/4 train the joint sentencepiece tokenizer"
python tools/train_tokenizer.py --input-dir "$OUT/bible" --output-prefix "$OUT/spm" --vocab-size 8000 \
  --sentences 100000 --temperature 5

echo "== 3/4 preprocess into megatron-core indexed datasets (both directions per bitext)"
python tools/preprocess_data.py --input-dir "$OUT/bible" --tokenizer "$OUT/spm.model" --output-dir "$OUT/data" \
  --workers "$WORKERS" --max-len 256 --max-ratio 3

echo "== 4/4 dataset and sampling summary"
python tools/data_stats.py --data-dir "$OUT/data" --temperature 5 --samples 1000000
