#!/usr/bin/env bash
# Every CUDA path of the project, once, at test size: a few minutes on one GPU.
#
#   scripts/gpu_check.sh [OUT]          run everything (default OUT: runs/gpu_check), stop at the first failure
#   DRY_RUN=1 scripts/gpu_check.sh      print the commands only
#
# Covers: `mimbench env`; MAE pre-training in bf16 with torch.compile (micro config, 1 epoch on 256 images);
# the linear probe, fine-tuning, k-NN, UperNet segmentation, attentive probe and low-shot evaluations of the
# encoder it exports (demo configs, a few hundred images); `bench --amp calibrate`; `bench --suite gpu --toy`;
# and a k-NN evaluation under a 1-GPU torchrun. MIMBENCH (default `python -m mimbench.cli`) picks the CLI.
set -euo pipefail

OUT=${1:-runs/gpu_check}
MB=${MIMBENCH:-python -m mimbench.cli}
PY=${PYTHON:-python}

run() {
    echo "+ $*"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

if [ -z "${DRY_RUN:-}" ]; then
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: scripts/gpu_check.sh needs a GPU')"
fi

EVAL_SMALL=(--set data.limit_train=256 --set data.limit_val=128)
TRAIN_SMALL=(--set schedule.epochs=1 --set schedule.warmup_epochs=0)

run $MB env
run $MB pretrain --config pretrain/configs/mae_micro_fmnist.py --out "$OUT/pretrain" \
    --set runtime.amp=bf16 --set runtime.compile=True --set data.limit=256 \
    --set schedule.epochs=1 --set schedule.warmup_epochs=0
if [ -z "${DRY_RUN:-}" ]; then
    ENC=$(ls "$OUT"/pretrain/*.safetensors | head -n 1)
else
    ENC="$OUT/pretrain/encoder.safetensors"
fi
run $MB eval linear --encoder "$ENC" --out "$OUT/linear" "${EVAL_SMALL[@]}" "${TRAIN_SMALL[@]}"
run $MB eval finetune --encoder "$ENC" --out "$OUT/finetune" "${EVAL_SMALL[@]}" "${TRAIN_SMALL[@]}"
run $MB eval knn --encoder "$ENC" --out "$OUT/knn" "${EVAL_SMALL[@]}"
run $MB eval segment --encoder "$ENC" --out "$OUT/segment" \
    --set train_cfg.max_iters=4 --set train_dataloader.batch_size=2
run $MB eval attentive --encoder "$ENC" --out "$OUT/attentive" "${EVAL_SMALL[@]}" "${TRAIN_SMALL[@]}"
if $PY -c "import cyanure" 2>/dev/null || [ -n "${DRY_RUN:-}" ]; then
    run $MB eval lowshot --encoder "$ENC" --out "$OUT/lowshot" "${EVAL_SMALL[@]}"
else
    echo "skipping eval lowshot: cyanure is not installed (pip install 'mimbench[lowshot]')"
fi
run $MB bench pretrain --config pretrain/configs/mae_micro_fmnist.py --batch 32 --steps 3 --warmup 1 \
    --amp calibrate --out "$OUT/bench"
run $MB bench --suite gpu --toy --steps 2 --warmup 1 --out "$OUT/bench" --append "$OUT/suite.md"
run torchrun --standalone --nproc_per_node=1 -m mimbench.cli eval knn --encoder "$ENC" --out "$OUT/knn-torchrun" \
    "${EVAL_SMALL[@]}"
echo "gpu_check: every command ran; records under $OUT"
