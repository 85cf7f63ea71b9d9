#!/usr/bin/env bash
# Real-data pipeline on one GPU: text -> shards -> pg-2026-03-23 training (short wallclock) -> legal evaluation.
# Usage: bash benchmarks/pg_pipeline.sh OUT_DIR [TRAIN_SECONDS] [EXTRA TRAINER FLAGS...]
# Env: EVAL_PROTOCOLS (evaluate the artifact when set), EVAL_FLAGS (extra evaluator flags), EVAL_TIMEOUT (s).
# Needs METATTT_DATA with text/, tokenizers/ and fineweb_sp1024_valprefix/ (see ../shared/data/README.md).
set -euo pipefail
out=${1:?usage: pg_pipeline.sh OUT_DIR [TRAIN_SECONDS] [flags...]}; secs=${2:-240}; shift $(( $# >= 2 ? 2 : 1 ))
D=${METATTT_DATA:?set METATTT_DATA}
TOK=$D/tokenizers/fineweb_1024_bpe.model
VAL="$D/fineweb_sp1024_valprefix/fineweb_val_*.bin"
mkdir -p "$out"
if [ ! -f data/pg/build_meta.json ]; then
  texts=("$D/text/fineweb_train")
  [ -d "$D/text/books_train" ] && texts+=("$D/text/books_train")
  python3 -m metattt.data build --text "${texts[@]}" --tokenizer "$TOK" --out data/pg --val-text "$D/text/fineweb_val"
fi
name=pg-$(date +%H%M%S)
python3 experiments/meta_ttt.py --preset pg-2026-03-23 --data data/pg --tokenizer "$TOK" --val-pattern "$VAL" \
  --max-wallclock-s "$secs" --warmdown-iters 150 --optim.muon-momentum-warmup-steps 100 --val-every 0 \
  --run-root runs --run-name "$name" --progress false --wandb off "$@" 2>&1 | tee "$out/train.log"
cp runs/$name/summary.json "$out/summary.json"
echo "runs/$name" > "$out/run_path"
if [ -n "${EVAL_PROTOCOLS:-}" ]; then
  timeout "${EVAL_TIMEOUT:-300}" python3 evaluators/legal_ttt.py "runs/$name/artifact.ptz" --protocols "$EVAL_PROTOCOLS" \
    ${EVAL_FLAGS:-} --run-dir "$out/eval" 2>&1 | tee "$out/eval.log"
fi
