#!/usr/bin/env bash
# The one prepared GPU run (H100/H200, <= 8 min): real-size random-weight Gemma 3 4B in bf16, 200 new tokens
# per image; loader, one-image loop, eager batches 64/128, compiled static batches 64/128/256, FLOP and roofs.
# Needs only torch, transformers, pillow, numpy, pyarrow (no exifread, no Hub access). See benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [OUT_DIR] [extra gpu_check.py flags]  -> OUT_DIR/gpu_check.json, gpu_check.md
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-./gpu_check_out}}
shift || true
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
# The script stops starting new runs at --budget-s (420 s) and rewrites its JSON after each one, so the
# hard limit below still leaves every finished section on disk.
timeout 450 "$PY" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
