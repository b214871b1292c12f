#!/usr/bin/env bash
# The one prepared GPU run (H100/H200): real-size random-weight Gemma 3 4B, 200 new tokens per image.
# Loop (the original one-image-per-generate script) and pipeline in the same process, on the same card.
# Needs only torch, transformers, pillow, pyarrow, tqdm (no img2dataset, datasets or Hub access).
#   bash benchmarks/gpu_check.sh [OUT_DIR]      -> OUT_DIR/gpu_bench.jsonl, one JSON line per configuration
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# Batch sweep first (pipeline only), then the loop baseline once next to the best-known batch size.
for bs in 32 64 128; do
  timeout 240 "$PY" benchmarks/bench_captioning.py --preset gemma-3-4b --images $((bs * 4)) --new-tokens 200 \
    --batch-size "$bs" --loader-workers 8 --skip-loop --out "$out/gpu_bench.jsonl" || echo "batch $bs failed ($?)"
done
timeout 300 "$PY" benchmarks/bench_captioning.py --preset gemma-3-4b --images 256 --loop-images 8 --new-tokens 200 \
  --batch-size 64 --loader-workers 8 --out "$out/gpu_bench.jsonl" || echo "loop+pipeline failed ($?)"
