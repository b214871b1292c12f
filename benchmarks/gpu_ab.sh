#!/usr/bin/env bash
# The A/B run for what was built after GPU run 2 (BENCHMARKS.md §6) on an H100/H200, in two parts of
# <= 5 min each (one device call each, so a failed part can be rerun alone):
#   diag   decode_diag.py, batch 64: the compiled split with the grouped decode attention, the attention
#          call alone, the compiled split with transformers' repeat_kv, the graph loop, profiles of a
#          generate and of a prefill, the vision tower eager vs compiled (then eager, if time is left)
#   check  gpu_check.py: compiled batches of 128, the whole pipeline without and with --vision-overlap,
#          the one-image loop (1 image), the loader
# Needs only the card's python (torch, transformers, pillow, numpy, pyarrow).
#   bash benchmarks/gpu_ab.sh OUT_DIR [diag|check|all]
#     -> OUT_DIR/diag/{decode_diag.json,profile.txt,decode_diag.log}, OUT_DIR/check/gpu_check.{json,md,log}
set -uo pipefail
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
case ${1:-} in
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_ab.sh: OUT_DIR may not start with '-': $1" >&2; usage >&2; exit 2 ;;
esac
part=${2:-all}
case $part in
    diag|check|all) ;;
    *) echo "gpu_ab.sh: unknown part '$part' (diag, check or all)" >&2; usage >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
out=${1:-${OUT:-./gpu_ab_out}}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/gpu.txt" || true
# Each script stops starting sections at its --budget-s and rewrites its JSON after each one: the timeout
# keeps every finished section.
if [[ $part == diag || $part == all ]]; then
    mkdir -p "$out/diag"
    TORCH_LOGS=perf_hints timeout 285 "$PY" benchmarks/decode_diag.py --out "$out/diag" --skip hf_static gil \
        --budget-s 210 > "$out/diag/decode_diag.log" 2>&1
    echo "decode_diag exit $?" | tee -a "$out/gpu.txt"
    grep '^{' "$out/diag/decode_diag.log" | cut -c1-1500
fi
if [[ $part == check || $part == all ]]; then
    mkdir -p "$out/check"
    timeout 285 "$PY" benchmarks/gpu_check.py --out "$out/check" --eager-batches --compiled-batches 128 \
        --graph-batches --loop-images 1 --timed-batches 2 --pipeline-images 256 --pipeline-overlap \
        --loader-images 48 --budget-s 250 > "$out/check/gpu_check.log" 2>&1
    echo "gpu_check exit $?" | tee -a "$out/gpu.txt"
    cat "$out/check/gpu_check.md" 2>/dev/null
fi
