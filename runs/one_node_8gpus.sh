#!/usr/bin/env bash
# One machine, 8 GPUs: one process per GPU, all writing parts into one checkpoint dir.
# Rerun the same command after a crash: finished keys are skipped whatever the number of GPUs.
# It runs from the checkout: relative paths you pass (--data-dir, ...) are relative to the checkout, not to
# where you started it. torchrun / accelerate exit 1 for any worker's non-zero code (README: Exit codes).
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do  # accelerate would start GPUS copies of the script, each printing the help
  case "$arg" in
    -h|--help|--help-all)
      echo "Usage: [GPUS=8] [MODEL=google/gemma-3-27b-it] runs/one_node_8gpus.sh [batched_image_inference.py flags]"
      echo "One machine: one process per GPU (accelerate launch), all writing parts into one checkpoint dir;"
      echo "rerun the same command after a crash."
      if [[ -x vlm-caption/bin/python ]]; then
        echo
        exec vlm-caption/bin/python batched_image_inference.py "$arg"
      fi
      echo "(No venv yet: ./setup.sh creates it; then --help also lists batched_image_inference.py's flags.)"
      exit 0 ;;
  esac
done
if [[ ! -x vlm-caption/bin/accelerate ]]; then  # was "vlm-caption/bin/accelerate: No such file or directory", 127
  echo "one_node_8gpus.sh: error: no $PWD/vlm-caption/bin/accelerate: run ./setup.sh in $PWD first" >&2
  exit 2
fi
if ! [[ ${GPUS:-8} =~ ^[1-9][0-9]*$ ]]; then
  echo "one_node_8gpus.sh: error: GPUS=${GPUS} is not a number of GPUs (a positive integer)" >&2
  exit 2
fi
MODEL=${MODEL:-google/gemma-3-27b-it}
vlm-caption/bin/accelerate launch --multi_gpu --num_processes "${GPUS:-8}" --num_machines 1 \
  --mixed_precision no --dynamo_backend no \
  batched_image_inference.py --model "$MODEL" "$@"  # (./checkpoints by default; a --checkpoint-dir of yours may follow)
