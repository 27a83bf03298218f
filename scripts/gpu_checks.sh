#!/usr/bin/env bash
# The checks this project runs when a machine with a CUDA GPU (and many cores) is at hand, one command:
#   bash scripts/gpu_checks.sh OUTPUT_DIR
# 1. MoPPA's speed targets on the GPU: every model timed round-robin in one process (moppa_nb.bench --interleave),
#    ViT-B/16 at 224 px, batch 64, bf16 autocast; then the per-method cost table on the GPU (step time, peak memory).
# 2. The default profile's main experiment (train@vtab) on the machine's CPU cores with one worker per core
#    (needs artifacts/default/prepared and artifacts/default/backbones from `dvc repro backbone`), its wall time and its
#    metrics, to compare with a 2-core run of the same commit (cross-machine differences of identical code and backbone).
# Needs torch, timm and this package importable (PYTHONPATH=.); writes everything under OUTPUT_DIR.
set -euo pipefail
out=${1:?usage: bash scripts/gpu_checks.sh OUTPUT_DIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MOPPA_NB_CACHE=${MOPPA_NB_CACHE:-/tmp/moppa_nb_cache}
python3 -c "import torch, timm, os; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'cores', len(os.sched_getaffinity(0)))"
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  python3 -m moppa_nb.bench --methods linear linear@eager lora ref_fused_lora moppa coeff --interleave 10 --calls 3 \
    --device cuda --batch-size 64 --output "$out/interleaved_cuda.csv" 2>&1 | tail -12
  python3 -m moppa_nb.bench --methods linear lora ref_fused_lora adapter coeff moppa lora+coeff rlrr dora spt moppa+rlrr+ssf \
    --device cuda --batch-size 64 --warmup 3 --repeats 10 --output "$out/bench_cuda.csv" 2>&1 | tail -16
fi
if [ -d artifacts/default/backbones/default ]; then
  jobs=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
  started=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES= python3 -m moppa_nb.runner --experiment vtab --output /tmp/gpu_checks_runs/vtab --metrics "$out/metrics_vtab" \
    --jobs "$jobs" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -3
  echo "train@vtab on $jobs CPU cores, $jobs workers: $(python3 -c "print(round($(date +%s.%N) - $started, 1))") s" | tee "$out/train_vtab_time.txt"
fi
