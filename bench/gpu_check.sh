#!/usr/bin/env bash
# GPU check of train_loop.py: bert-base-sized (random weights, no network needed), a few hundred
# steps each in fp32, fp32 with TF32, fp16 and bf16 through `accelerate launch`, then one full
# 25k-review epoch in bf16 (goal on one H100: under 30 s). Prints samples/s after a warm-up,
# tokens/s, MFU against a matmul peak in the run's own precision timed in the same run, peak GPU
# memory, eval accuracy, and fails if a loss is not finite or the fp16 grad scaler misbehaves.
# Then FSDP2 and DeepSpeed ZeRO-2 (bench/engine_check.py): finite losses, exact resume, a loadable model.
#
#   bash bench/gpu_check.sh                      # STEPS=300 BATCH=32 FULL_EPOCH=1 by default
#   STEPS=100 FULL_EPOCH=0 bash bench/gpu_check.sh
#   SMOKE=1 bash bench/gpu_check.sh              # tiny model on CPU: checks the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
BATCH=${BATCH:-32}
FULL_EPOCH=${FULL_EPOCH:-1}
WORK=${WORK:-$(mktemp -d /tmp/gpu-check.XXXX)}
export TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1 HF_HUB_OFFLINE=1

if [ "${SMOKE:-0}" = 1 ]; then
    python bench/gpu_check.py make --out "$WORK" --smoke
    LAUNCH=(accelerate launch --cpu --num_processes 1 --num_machines 1 --dynamo_backend no)
    RUNS=("fp32:no")                                   # name:accelerate's --mixed_precision
    EXTRA=(--learning_rate 1e-3 --workers 0)           # a tiny random model learns fast, on the CPU's cores
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python bench/gpu_check.py make --out "$WORK"
    LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no)
    RUNS=("fp32:no" "tf32:no" "fp16:fp16" "bf16:bf16")
    EXTRA=()
fi

for run in "${RUNS[@]}"; do
    name=${run%%:*}
    echo "== $name: $STEPS steps, batch $BATCH"
    "${LAUNCH[@]}" --mixed_precision "${run##*:}" bench/gpu_check.py run --out "$WORK" \
        --precision "$name" --steps "$STEPS" --batch "$BATCH" "${EXTRA[@]}" > "$WORK/$name.log" 2>&1 \
        || { tail -30 "$WORK/$name.log"; exit 1; }
done
if [ "$FULL_EPOCH" = 1 ] && [ "${SMOKE:-0}" != 1 ]; then
    echo "== bf16: one full epoch of 25,000 reviews"
    "${LAUNCH[@]}" --mixed_precision bf16 bench/gpu_check.py run --out "$WORK" --precision bf16 \
        --batch "$BATCH" --full_epoch > "$WORK/bf16-epoch.log" 2>&1 || { tail -30 "$WORK/bf16-epoch.log"; exit 1; }
fi
python bench/gpu_check.py report --out "$WORK"

# The engines accelerate config offers, on one GPU with the shipped configs: finite losses, a resumed
# run equal to a straight one, a pipeline()-loadable model (bench/engine_check.py). On a CPU (SMOKE)
# only DeepSpeed runs (accelerate shards with FSDP on GPUs only), and only where it is installed.
if [ "${SMOKE:-0}" = 1 ]; then
    if python -c "import deepspeed" 2>/dev/null; then
        python bench/engine_check.py --out "$WORK" --config configs/deepspeed_zero2_bf16.yaml --steps 6 --batch 8 --cpu
    fi
else
    python bench/engine_check.py --out "$WORK" --config configs/fsdp2_bf16.yaml --config configs/deepspeed_zero2_bf16.yaml
fi
