#!/usr/bin/env bash
# One prepared GPU check, <= 8 minutes on one GPU: the bf16 step benchmark of ViT-S/16 and ViT-B/16 (LOCA and a
# supervised step; images/s, MFU against the measured bf16 matmul rate, peak memory), then a 2-minute
# pretraining smoke run (ViT-S/16, bf16, built-in photos, batched on-device views). Needs torch with CUDA and
# this package installed (pip install -e .). Results go to ${OUT:-runs/gpu}; paste them into docs/benchmarks.md.
set -euo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 300 python benchmarks/gpu_step.py --steps 10 | tee "$OUT/step.md"
timeout 150 python -m loca pretrain --config vit_small_16 --device cuda --precision bf16 --out "$OUT/smoke" \
    --workers 8 optim.batch_size=128 optim.epochs=100 run.builtin_images=25600 run.log_every=10 \
    views.device_views=true run.max_steps=60 2>&1 | tee "$OUT/smoke.log" || true
tail -n 3 "$OUT/smoke/metrics.jsonl" 2>/dev/null || echo "no metrics written by the smoke run"
