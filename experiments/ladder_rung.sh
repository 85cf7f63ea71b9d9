#!/usr/bin/env bash
# One rung of the scaling ladder (issue 29) in one self-contained GPU call: build the ladder data (about 100 s on the
# device's CPUs; nothing is kept between calls), train SIZE's constant-lr parent alone, then each decay branch and its
# core cells (indist, fineweb) one process at a time while the time lasts, and tar the run directories without their
# checkpoints into $OUT. Why one process at a time: several on one GPU were no faster per cell and raced to train
# the shared parent (docs/reproduction.md). An interrupted cell is moved aside by ceiling.py and rerun next time.
#
#   source .device/setup.sh && bash experiments/ladder_rung.sh 2m 540      # on the device, from the repo root
#   bash experiments/ladder_rung.sh 4m --plan      # print the parent and branches it would run, then exit
#   tar xzf ladder-2m.tgz && python experiments/ceiling.py --config experiments/ceiling_ladder.toml --report-only
set -uo pipefail
size=${1:?usage: bash experiments/ladder_rung.sh SIZE [SECONDS] (SIZE as in the ladder-SIZE presets, e.g. 2m)}
budget=${2:-540}
cfg=experiments/ceiling_ladder.toml
out=${OUT:-runs}
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
grep -q "^name = \"ladder-$size.wsd\"" "$cfg" || { echo "error: no model ladder-$size.wsd in $cfg" >&2; exit 2; }
# the decay branches of the first seed (names like ladder-4m.dn12.5: budgets may have decimals; -s2 is the 2nd seed)
branches=$(grep -o "^name = \"ladder-$size\.dn[0-9.]*\"" "$cfg" | cut -d'"' -f2)
[ -n "$branches" ] || { echo "error: no decay branch ladder-$size.dn* in $cfg" >&2; exit 2; }
if [ "$budget" = "--plan" ]; then echo "parent: ladder-$size.wsd"; echo "branches:" $branches; exit 0; fi
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "error: SECONDS must be a whole number, got '$budget'" >&2; exit 2; }
: "${METATTT_DATA:?set METATTT_DATA (source .device/setup.sh)}"
if [ ! -f data/ladder/build_meta.json ]; then
  python -m metattt.data build --text "$METATTT_DATA/text/fineweb_train" \
    --pseudo-doc-text "$METATTT_DATA/text/books_train" "$METATTT_DATA/text/sotu" \
    --indist-val-frac 0.1 --indist-val-books 40 --tokenizer "$METATTT_DATA/tokenizers/fineweb_1024_bpe.model" \
    --out data/ladder || exit 1
fi
echo "data ready at $(( $(date +%s) - t0 )) s"
[ "$(left)" -gt 60 ] || { echo "error: $(left) s left after the data build" >&2; exit 1; }  # timeout 0 = no limit
timeout "$(left)" python experiments/ceiling.py --config "$cfg" --no-report --only "ladder-$size.wsd"
for m in $branches; do
  [ "$(left)" -gt 60 ] || { echo "stopped before $m: $(left) s left"; break; }
  timeout "$(left)" python experiments/ceiling.py --config "$cfg" --no-report --only "$m/indist" --only "$m/fineweb"
done
mkdir -p "$out"
tar czf "$out/ladder-$size.tgz" --exclude='*.pt' --exclude='*.ptz' runs/ceiling-ladder
echo "ladder-$size: $(( $(date +%s) - t0 )) s; $out/ladder-$size.tgz"
