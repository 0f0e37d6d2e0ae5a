#!/usr/bin/env bash
# Iterative compression, the research note's schedule as a shell loop: gather statistics, cut a little,
# fine-tune briefly, and repeat until the model is down to a target fraction of the original MACs.
#
#   bash examples/iterative.sh                  # rankcut:mnist-cnn on mnist5k down to half its MACs
#   TARGET=0.3 STEP=0.8 bash examples/iterative.sh
#   BASE=rankcut-mnist/trained.safetensors bash examples/iterative.sh   # start from a trained model
#
# Every step is three plain commands (stats -> project -> finetune) on the previous step's output, plus an
# eval; every file is kept (stepN.safetensors, and each command's --json result), so any step can be
# inspected, evaluated again or used as the BASE of another run.
#
# Each step removes a slice of the current MACs with a global budget, `project --macs STEP` (keep at most
# STEP of the current MACs, spent where the method predicts the least loss), and the last step asks for
# exactly what is left to reach TARGET. A uniform `project --keep 0.9` would stall on this network: a
# rank-58 pair for conv2 (58 x (32*3*3 + 64) = 20,416 MACs per position) costs more than conv2 itself
# (64 x 32*3*3 = 18,432), so rankcut leaves conv2 whole at every step and only fc1 shrinks. Once a layer is
# a pair, re-projecting it composes (the pair just gets narrower), so `--keep` works on models whose
# first cut already saves.
#
# Settings (environment variables):
#   OUT            folder for every file (default rankcut-iterative)
#   BASE           a trained checkpoint to start from (default: init rankcut:mnist-cnn and train it)
#   EPOCHS         epochs to train the base model when BASE is not given (default 1)
#   TARGET         stop at this fraction of the base model's MACs (default 0.5)
#   STEP           each step keeps at most this fraction of the current MACs (default 0.8)
#   METHOD         pca, fisher or hessian (default fisher; the statistics include --grad kl)
#   SAMPLES        training images for each step's statistics (default 1000)
#   TUNE_SAMPLES   training images for each step's fine-tuning, one pass (default 1000)
#   TRAIN_SAMPLES  training images for the base model (default: all 4,000)
#   TEST_SAMPLES   test images for the accuracies (default: all 1,000)
#   MAX_STEPS      give up after this many steps (default 30)
#   DEVICE         auto, cpu or cuda (default auto)
set -euo pipefail

OUT=${OUT:-rankcut-iterative}
BASE=${BASE:-}
EPOCHS=${EPOCHS:-1}
TARGET=${TARGET:-0.5}
STEP=${STEP:-0.8}
METHOD=${METHOD:-fisher}
SAMPLES=${SAMPLES:-1000}
TUNE_SAMPLES=${TUNE_SAMPLES:-1000}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-}
TEST_SAMPLES=${TEST_SAMPLES:-}
MAX_STEPS=${MAX_STEPS:-30}
DEVICE=${DEVICE:-auto}

command -v rankcut >/dev/null || { echo "error: rankcut is not on PATH (pip install -e '.[demo]')" >&2; exit 1; }
if [[ -n $BASE ]]; then BASE=$(realpath "$BASE"); fi
test=(--data mnist5k:test --device "$DEVICE" ${TEST_SAMPLES:+--samples "$TEST_SAMPLES"})
mkdir -p "$OUT"
cd "$OUT"
say() { echo "==> [${SECONDS} s] $*" >&2; }
# json FILE EXPRESSION: evaluate a Python expression over the JSON object `r` read from FILE.
json() { python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }
calc() { python3 -c "print($1)"; }

if [[ -z $BASE ]]; then
    say "init rankcut:mnist-cnn and train it for $EPOCHS epoch(s)"
    rankcut init --arch rankcut:mnist-cnn --seed 0 -o base.safetensors --json > base.json
    rankcut finetune base.safetensors --data mnist5k:train --device "$DEVICE" \
        ${TRAIN_SAMPLES:+--samples "$TRAIN_SAMPLES"} --epochs "$EPOCHS" --optimizer adamw --lr 2e-3 --batch-size 32 \
        -o step0.safetensors --json > step0.train.json
else
    cp "$BASE" step0.safetensors
fi
rankcut eval step0.safetensors "${test[@]}" --json > step0.eval.json
base_macs=$(json step0.eval.json 'r["results"][0]["macs"]')
fraction=1
trajectory=("$(printf '%4s  %6s  %13s  %15s  %s' step MACs 'top-1 cut' 'top-1 +tuning' checkpoint)"
            "$(printf '%4d  %6.3f  %13s  %14.2f%%  %s' 0 1 '' "$(json step0.eval.json '100 * r["results"][0]["top1"]')" step0.safetensors)")

n=0
while [[ $(calc "int($fraction > $TARGET + 1e-9)") == 1 ]]; do
    n=$((n + 1))
    if ((n > MAX_STEPS)); then echo "error: not at $TARGET of the MACs after $MAX_STEPS steps" >&2; exit 1; fi
    prev=step$((n - 1)).safetensors
    # This step keeps STEP of the current MACs, or exactly what lands on TARGET when a regular step would
    # end within 5% above it (no sliver of a last step) or below it.
    keep=$(calc "round($TARGET / $fraction if $fraction * $STEP < 1.05 * $TARGET else $STEP, 6)")
    say "step $n: stats, project --macs $keep, fine-tune on $TUNE_SAMPLES images"
    rankcut stats "$prev" --data mnist5k:train --device "$DEVICE" --samples "$SAMPLES" --grad kl \
        -o "step$n.stats.npz" --json > "step$n.stats.json"
    rankcut project "$prev" --stats "step$n.stats.npz" --method "$METHOD" --macs "$keep" \
        -o "step$n.cut.safetensors" --json > "step$n.cut.json"
    rankcut finetune "step$n.cut.safetensors" --data mnist5k:train --device "$DEVICE" --samples "$TUNE_SAMPLES" \
        --seed "$n" --epochs 1 --optimizer adamw --lr 1e-3 --batch-size 32 -o "step$n.safetensors" \
        --json > "step$n.train.json"
    rankcut eval "step$n.cut.safetensors" "step$n.safetensors" "${test[@]}" --json > "step$n.eval.json"
    previous=$fraction
    fraction=$(json "step$n.eval.json" "r['results'][1]['macs'] / $base_macs")
    if [[ $(calc "int($fraction >= $previous)") == 1 ]]; then
        echo "error: step $n did not reduce the MACs (fraction $fraction)" >&2; exit 1
    fi
    trajectory+=("$(printf '%4d  %6.3f  %12.2f%%  %14.2f%%  %s' "$n" "$fraction" \
        "$(json "step$n.eval.json" '100 * r["results"][0]["top1"]')" \
        "$(json "step$n.eval.json" '100 * r["results"][1]["top1"]')" "step$n.safetensors")")
done

echo "$METHOD, each step --macs $STEP of the current MACs, down to $TARGET of the base model's MACs;"
echo "MACs as a fraction of the base model's; top-1 on mnist5k:test right after the cut and after fine-tuning"
printf '%s\n' "${trajectory[@]}"
say "done: $(pwd)/step$n.safetensors"
