#!/usr/bin/env bash
# The `make demo` job, end to end on CPU: real Bible bitext -> joint tokenizer -> indexed datasets -> sampling
# summary -> a tiny shared-dynamic task-MoE trained with expert parallelism over 2 processes -> per-task BLEU table
# on the test books -> routing pictures (tasks x experts / adapters, and over training from the logged routing
# records). About 17 minutes on 2 CPU cores.
# Usage: bash examples/demo.sh OUTPUT_DIR   (uses the `python` on PATH; `make demo` puts .venv/bin first)
set -euo pipefail
OUT="${1:?usage: examples/demo.sh OUTPUT_DIR}"
cd "$(dirname "$0")/.."
LANGS="${DEMO_LANGUAGES:-fr de ru}"  # Romance, Germanic, Slavic: 6 directions
WORKERS="${DEMO_WORKERS:-$(nproc)}"
mkdir -p "$OUT"

echo "== 1/6 prepare Bible bitext (en <-> ${LANGS})"
python examples/bible/prepare_data.py --output-dir "$OUT/bible" --languages $LANGS

echo "== 2/6 train the joint sentencepiece tokenizer"
python tools/train_tokenizer.py --input-dir "$OUT/bible" --output-prefix "$OUT/spm" --vocab-size 4000 \
  --sentences 100000 --temperature 5

echo "== 3/6 preprocess into megatron-core indexed datasets (both directions per bitext)"
python tools/preprocess_data.py --input-dir "$OUT/bible" --tokenizer "$OUT/spm.model" --output-dir "$OUT/data" \
  --workers "$WORKERS" --max-len 90 --max-ratio 3

echo "== 4/6 dataset and sampling summary"
python tools/data_stats.py --data-dir "$OUT/data" --temperature 5 --samples 1000000

echo "== 5/6 train a shared-dynamic task-MoE, expert parallel over 2 processes (torchrun, gloo on CPU)"
python -m torch.distributed.run --nproc-per-node 2 --master-port "${DEMO_PORT:-29517}" pretrain_mt.py \
  --config examples/configs/demo_bible.yaml --set data.data_dir="$OUT/data" --set train.run_dir="$OUT/run" \
  ${DEMO_STEPS:+--set train.steps=$DEMO_STEPS}

echo "== 6/6 per-task BLEU/chrF on the test books, and the routing picture"
python tools/evaluate.py --checkpoint "$OUT/run" --data "$OUT/bible" --split test --system shared-dynamic \
  --max-sentences "${DEMO_TEST_SENTENCES:-60}" --metric both --output "$OUT/test_scores.md" \
  --routing-json "$OUT/routing.json" --routing-png "$OUT/routing.png"
cat "$OUT/test_scores.md"
python tools/analyze_routing.py --metrics "$OUT/run/metrics.jsonl" --out "$OUT/routing_over_training" --overwrite
echo "training log: $OUT/run/metrics.jsonl; routing picture: $OUT/routing.png, over training:" \
  "$OUT/routing_over_training/; scores: $OUT/test_scores.md"
