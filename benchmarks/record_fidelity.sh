#!/usr/bin/env bash
# Issue 32's "one more model": train a model with the record's own script (other seed and length than the reference
# models), then import it and score it with --compat pg-record, in one self-contained GPU call; the record's printed
# numbers (printed.json), ours (eval.json) and the record's artifact come back through $OUT (docs/interop.md).
# Needs a copy of the record's train_gpt.py (not part of this repo), by default .device/record/train_gpt.py.
#
#   source .device/setup.sh && bash benchmarks/record_fidelity.sh [SEED] [TRAIN_SECONDS] [SCRIPT]
set -uo pipefail
seed=${1:-7}
secs=${2:-150}
script=${3:-.device/record/train_gpt.py}
out=${OUT:-runs}
: "${METATTT_DATA:?set METATTT_DATA (source .device/setup.sh)}"
[ -f "$script" ] || { echo "error: no record script at $script (copy it from the Parameter Golf repository)" >&2; exit 2; }
tok="$METATTT_DATA/tokenizers/fineweb_1024_bpe.model"
val="$METATTT_DATA/fineweb_sp1024_valprefix/fineweb_val_*.bin"
run=runs/pg549-seed$seed
t0=$(date +%s)
if [ ! -f data/rec/build_meta.json ]; then  # FineWeb documents + whatever book parts are staged, 50 val documents
  books=(); [ -d "$METATTT_DATA/text/books_train" ] && books=(--pseudo-doc-text "$METATTT_DATA/text/books_train")
  python -m metattt.data build --text "$METATTT_DATA/text/fineweb_train" "${books[@]}" --val-docs 50 \
    --tokenizer "$tok" --out data/rec || exit 1
fi
echo "data ready at $(( $(date +%s) - t0 )) s"
python benchmarks/record_model.py --script "$script" --train 'data/rec/fineweb_train_*.bin' --val "$val" \
  --tokenizer "$tok" --out "$run" --readme-env --env EMA_DECAY=0.99 WARMDOWN_ITERS=150 MAX_WALLCLOCK_SECONDS="$secs" \
  SEED="$seed" || { tail -c 3000 "$run/train.log"; exit 1; }
echo "record model at $(( $(date +%s) - t0 )) s"
mkdir -p "$out/pg549-seed$seed"  # the record's own numbers and artifact come back even if our evaluation is cut short
cp "$run/printed.json" "$run/final_model.int6.ptz" "$out/pg549-seed$seed/"
python -m metattt import-pg "$run/final_model.int6.ptz" --out "$run/artifact.ptz" --tokenizer "$tok" --force > /dev/null || exit 1
python evaluators/legal_ttt.py "$run/artifact.ptz" --val "$val" --protocols flat,sliding,ttt:sgd --compat pg-record \
  --bootstrap 0 --no-audit --wandb off --run-dir "$run/ev" || exit 1
cp "$run/ev/eval.json" "$out/pg549-seed$seed/"
echo "done at $(( $(date +%s) - t0 )) s: $out/pg549-seed$seed"
# runs/pg549-seed$seed holds the record's artifact and log as a reference model does, so a next call on the same
# warm machine can size each numerics switch on it (docs/interop.md):
#   METATTT_REFERENCE=runs python benchmarks/compat_residual.py --models pg549-seed$seed --variants-on pg549-seed$seed
