#!/usr/bin/env bash
# Issue 33's ratio in one GPU call: the record script's training step (README environment, TTT off, one GPU, so
# 8-fold accumulation of the 786,432-token step) and benchmarks/train_throughput.py's variants, on the same GPU one
# after the other. Token values do not change step time, so the record trains on the val prefix and validates on
# its first 131,073 tokens (its evaluations are not what is timed; sliding is off). Prints ms/step of each and the
# ratio record / ours; throughput.json and the record's log come back through $OUT.
# Needs a copy of the record's train_gpt.py (not part of this repo), by default .device/record/train_gpt.py.
#
#   source .device/setup.sh && bash benchmarks/step_rate_ratio.sh [VARIANTS] [RECORD_STEPS] [SCRIPT]
set -uo pipefail
variants=${1:-compile,compile+bf16,compile+bf16+fp8}
steps=${2:-40}
script=${3:-.device/record/train_gpt.py}
out=${OUT:-runs}
if ! [[ "$steps" =~ ^[0-9]+$ ]] || [ "$steps" -lt 10 ]; then
  echo "error: RECORD_STEPS must be a whole number >= 10, got '$steps'" >&2; exit 2
fi
[ -f "$script" ] || { echo "error: no record script at $script (copy it from the Parameter Golf repository)" >&2
                      exit 2; }
: "${METATTT_DATA:?set METATTT_DATA (source .device/setup.sh)}"
val=$(ls "$METATTT_DATA"/fineweb_sp1024_valprefix/fineweb_val_*.bin | head -1)
run=runs/record-rate
mkdir -p "$run" "$out"
python - "$val" "$run/val_small.bin" <<'EOF' || exit 1
import sys
from metattt.data.shards import read_shard, write_shard
write_shard(sys.argv[2], read_shard(sys.argv[1])[:131073])
EOF
python benchmarks/record_model.py --script "$script" --train "$val" --val "$run/val_small.bin" \
  --tokenizer "$METATTT_DATA/tokenizers/fineweb_1024_bpe.model" --out "$run" --readme-env \
  --env TTT_ENABLED=0 EVAL_STRIDE=0 ITERATIONS="$steps" TRAIN_LOG_EVERY=10 VAL_LOSS_EVERY=0 > /dev/null \
  || { tail -c 3000 "$run/train.log"; exit 1; }
cp "$run/train.log" "$out/record_rate.log"
python benchmarks/train_throughput.py --variants "$variants" --steps 8 --warmup 3 --out "$out/throughput.json" \
  > "$out/throughput.log" 2>&1 || { tail -c 3000 "$out/throughput.log"; exit 1; }
python - "$run/train.log" "$out/throughput.json" <<'EOF'
import json, re, sys
avg = re.findall(r"step:(\d+)/\d+ .*step_avg:([0-9.]+)ms", open(sys.argv[1]).read())
if not avg:
    sys.exit("error: no step_avg line in the record's log")
step, rec = int(avg[-1][0]), float(avg[-1][1])
rows = json.load(open(sys.argv[2]))
print(f"{rows[0]['device']}: record script {rec:.1f} ms/step (mean over its {step} timed steps)")
for r in rows:
    print(f"  {r['variant']:<24}{r['ms_per_step']:8.1f} ms/step   record / ours = {rec / r['ms_per_step']:.3f}x")
EOF
