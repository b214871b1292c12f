#!/usr/bin/env bash
# The next GPU session's run (BENCHMARKS.md §6 run 5 measured the one before), in parts, in the order to run
# them: kv8 in the first device call, prof,diag in the second (timeout 595 s each; each part's timeout is cut to
# what is left of GPU_AB_SECONDS, default 590, from the script's start); fp8, thresh, cont, check, big and retry
# in later sessions, a device call each:
#   kv8    gpu_check.py: graph_flex at 512 (what --batch-size auto picks on an 80 GB card, untimed so far), then
#          at 512 with --kv-cache-dtype fp8 (kv_fp8.py: keys and values cached as float8, which FlexAttention
#          reads as they are: half the bytes of the larger part of a decode step; its JSON's attention says
#          whether flex took them or gave up; ~2.5 min each with its compiles, run 5's at 256 ~2 min), then one
#          more fp8 batch under the profiler (its timed batches are on disk first: a timeout keeps them); before it,
#          bench_attention.py: one layer's decode attention at 256 and 512 rows, flex on bf16 against flex on
#          float8 keys and values (<= 1 min) (<= 9 min in all)
#   prof   gpu_check.py: graph_flex at 256 (what --compile runs: run 5's 32.18 img/s) and at 512 (what
#          --batch-size auto now picks where memory allows, the vision tower in chunks of 64 images), each with
#          one more batch under the profiler: ms an image by kind of kernel (attention, GEMMs, FlexAttention,
#          fused Triton, eager aten) for the prefill and for the decode (gpu_profile.py), where run 5 only had
#          estimates from separate runs at batch 64; and at 256 with the tower over the whole batch at once
#          (whole_tower: the chunks' A/B). With the prefill's layers compiled one by one and the tower's
#          attention kernel timed and chosen (--vision-attention auto), all new since run 5 (<= 8 min)
#   diag   bench_attention.py --tower: the vision tower's attention alone (4,096 patches, head size 72, for
#          which flash attention has no kernel of its own) on each sdpa kernel and FlexAttention, ms an image
#          and TFLOP/s (<= 1 min); decode_diag.py, batch 64 (run 3's): the vision tower on each sdpa kernel
#          (flash, cuDNN, efficient) and compiled as --compile does; a profile of a compiled generate and of a
#          prefill (where the prefill's time goes); then, if its budget is left, the prefill and first token with the
#          language model eager vs compiled (run 5 timed both compiled together: 1.20x) (<= 4.5 min)
#   fp8    bench_fp8.py: each linear-layer shape of the 4B (SigLIP, the language model's prefill, and the
#          decode step's, which run 5 lost to dynamo's recompile limit) at 16 images' rows, bf16 against
#          --quantize fp8's compiled FP8 GEMM, and whether inductor fuses the FP8 input's scaling into the
#          norm before it on the card as it does on a CPU (<= 2.5 min); then gpu_check.py with the model quantized as
#          --quantize fp8-text does (the language model only: run 5's GEMMs ran 1.11x there, 0.64x in the
#          tower) and graph_flex at 256 in FP8, against run 5's 32.18 img/s in bf16, profiled as prof (the
#          compile alone took ~230 s in bf16; run 5's attempt at it was cut off) (<= 7 min)
#   thresh gpu_check.py at batch 128, where --decode-attention auto starts taking FlexAttention (run 4: flex
#          1.45x faster a layer at 256, 1.22x slower at 64, 128 unmeasured): the graph loop with the grouped
#          sdpa vs with flex (<= 4 min)
#   cont   bench_continuous.py: --decode-loop continuous against whole batches of 512 (what --batch-size auto
#          picks now), the 4B, 1,536 images at caption lengths drawn from 50-200 tokens, chunks of 64 (the
#          default, slots/8) and 32, with the default decode attention (flex; run 4 timed 256 slots in chunks of
#          32 with the grouped sdpa: 1.07x) (<= 5.5 min)
#   check  run 5's check at what --batch-size auto picks now: gpu_check.py, graph_flex at 512, then the whole
#          pipeline over 1,536 images at 512 (its second batch of three is the steady one; run 5: 33.88 img/s
#          at 256) (<= 7 min)
#   big    gpu_check.py: graph_flex at 1,024 rows (an H200's 141 GB hold them: ~73 GB of KV cache), profiled,
#          against prof's 512: whether AUTO_BATCH_CAP should rise on the larger cards (<= 8 min)
#   retry  bench_retry_pool.py: the whole pipeline at 512, 1,536 images, 3 % of first captions flagged (by
#          key), retried after each batch vs gathered 64 at a time (what a GPU does now), and one retry call's
#          time at 1 and at 64 rows; compiles ~4 min first (a device call of its own: <= 9.5 min)
# Needs only the card's python (torch, transformers, pillow, numpy, pyarrow).
#   bash benchmarks/gpu_ab.sh OUT_DIR [kv8|prof|diag|fp8|thresh|cont|check|big|retry|all]   (or a comma list)
#     -> OUT_DIR/kv8/{attention.log,gpu_check.{json,md,log},profile_kv_fp8_512.txt}, OUT_DIR/prof/{gpu_check.{json,md,log},profile_graph_flex_{256,512}.txt}, OUT_DIR/diag/{decode_diag.json,
#        profile.txt,decode_diag.log,tower_attention.log},
#        OUT_DIR/fp8/{bench_fp8.log,gpu_check.{json,md,log},profile_fp8_256.txt},
#        OUT_DIR/thresh/gpu_check.{json,md,log}, OUT_DIR/cont/bench_continuous.log,
#        OUT_DIR/check/gpu_check.{json,md,log}, OUT_DIR/big/{gpu_check.{json,md,log},profile_graph_flex_1024.txt},
#        OUT_DIR/retry/bench_retry_pool.log
set -uo pipefail
usage() { sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }  # the header, up to the code
case ${1:-} in
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_ab.sh: OUT_DIR may not start with '-': $1" >&2; usage >&2; exit 2 ;;
esac
parts=${2:-all}
[[ $parts == all ]] && parts=kv8,prof,diag,fp8,thresh,cont,check,big,retry
IFS=, read -ra wanted <<< "$parts"
for part in "${wanted[@]}"; do
    case $part in
        kv8|prof|diag|fp8|thresh|cont|check|big|retry) ;;
        *) echo "gpu_ab.sh: unknown part '$part' (kv8, prof, diag, fp8, thresh, cont, check, big, retry, all, or a comma list of them)" >&2
           usage >&2; exit 2 ;;
    esac
done
want() { [[ ,$parts, == *,$1,* ]]; }
deadline=${GPU_AB_SECONDS:-590}
# A part's own timeout, cut to what is left of the call's deadline; 0 when under a minute is left.
timeout_for() { local left=$((deadline - SECONDS)); ((left < 60)) && { echo 0; return; }; echo $(($1 < left ? $1 : left)); }
skipped() { echo "$1 skipped: under a minute of GPU_AB_SECONDS=$deadline left" | tee -a "$out/gpu.txt"; }
out=${1:-${OUT:-./gpu_ab_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # (a relative OUT_DIR is the caller's, not the repo root's)
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/gpu.txt" || true
# Each script stops starting sections at its --budget-s and rewrites its JSON after each one: the timeout
# keeps every finished section.
# gpu_check.py into OUT/$1 with its other arguments, at most $2 seconds (cut to the deadline).
gpu_check() {
  local part=$1 limit=$2; shift 2
  local t; t=$(timeout_for "$limit")
  if ((t == 0)); then skipped "$part"; return; fi
  mkdir -p "$out/$part"
  timeout "$t" "$PY" benchmarks/gpu_check.py --out "$out/$part" --eager-batches --compiled-batches --graph-batches \
      --loop-images 0 --timed-batches 3 --loader-images 48 "$@" > "$out/$part/gpu_check.log" 2>&1
  echo "gpu_check ($part) exit $?" | tee -a "$out/gpu.txt"
  cat "$out/$part/gpu_check.md" 2>/dev/null
}
if want kv8; then
  mkdir -p "$out/kv8"
  t=$(timeout_for 60)  # one layer's decode attention at 256 and 512 rows: flex on bf16 vs float8 keys and values
  if ((t == 0)); then skipped kv8_attention; else
    timeout "$t" "$PY" benchmarks/bench_attention.py --device cuda --batch 256 512 --rounds 3 --calls 10 --backends \
        > "$out/kv8/attention.log" 2>&1
    echo "bench_attention (kv8) exit $?" | tee -a "$out/gpu.txt"
    grep '^{' "$out/kv8/attention.log" | cut -c1-1500
  fi
  gpu_check kv8 470 --graph-flex-batches 512 --kv-fp8-batches 512 --profile kv_fp8 --pipeline-images 0 \
      --loader-images 8 --timed-batches 2 --budget-s 440
fi
want prof && gpu_check prof 480 --graph-flex-batches 256 512 --whole-tower-batches 256 --profile graph_flex \
    --pipeline-images 0 --loader-images 8 --timed-batches 2 --budget-s 450
if want fp8; then
  t=$(timeout_for 150)
  if ((t == 0)); then skipped fp8; else
    mkdir -p "$out/fp8"
    timeout "$t" "$PY" benchmarks/bench_fp8.py --device cuda --preset gemma-3-4b --batch 16 --decode --rounds 5 \
        --sections gemms fusion > "$out/fp8/bench_fp8.log" 2>&1
    echo "bench_fp8 exit $?" | tee -a "$out/gpu.txt"
    grep '^{' "$out/fp8/bench_fp8.log" | cut -c1-4000
  fi
  gpu_check fp8 430 --pipeline-images 0 --loader-images 8 --fp8-batches 256 --fp8-quantize fp8-text \
      --profile fp8 --timed-batches 2 --budget-s 400
fi
if want diag; then
  mkdir -p "$out/diag"
  t=$(timeout_for 60)  # the vision tower's attention by kernel (head size 72: no flash kernel of its own)
  if ((t == 0)); then skipped tower_attention; else
    timeout "$t" "$PY" benchmarks/bench_attention.py --device cuda --tower --batch 8 --rounds 3 --calls 5 \
        > "$out/diag/tower_attention.log" 2>&1
    echo "bench_attention --tower exit $?" | tee -a "$out/gpu.txt"
    grep '^{' "$out/diag/tower_attention.log" | cut -c1-1500
  fi
  t=$(timeout_for 205)
  if ((t == 0)); then skipped diag; else
    TORCH_LOGS=perf_hints timeout "$t" "$PY" benchmarks/decode_diag.py --out "$out/diag" --batch 64 \
        --skip compiled attention compiled_repeat_kv graph eager gil hf_static --budget-s 140 \
        > "$out/diag/decode_diag.log" 2>&1
    echo "decode_diag exit $?" | tee -a "$out/gpu.txt"
    grep '^{' "$out/diag/decode_diag.log" | cut -c1-1500
  fi
fi
want thresh && gpu_check thresh 240 --graph-batches 128 --graph-flex-batches 128 --pipeline-images 0 --budget-s 200
if want cont; then
  t=$(timeout_for 330)
  if ((t == 0)); then skipped cont; else
    mkdir -p "$out/cont"
    timeout "$t" "$PY" benchmarks/bench_continuous.py --preset gemma-3-4b --images 1536 --slots 512 \
        --max-tokens 200 --min-frac 0.25 --chunk-rows 64 32 --rounds 1 > "$out/cont/bench_continuous.log" 2>&1
    echo "bench_continuous exit $?" | tee -a "$out/gpu.txt"
    grep '^{' "$out/cont/bench_continuous.log" | cut -c1-1500
  fi
fi
if want check; then
  gpu_check check 420 --graph-flex-batches 512 --pipeline-images 1536 --pipeline-batch 512 \
      --pipeline-runs graph --timed-batches 2 --budget-s 400
fi
want big && gpu_check big 480 --graph-flex-batches 1024 --profile graph_flex --pipeline-images 0 --loader-images 8 \
    --timed-batches 2 --budget-s 450
if want retry; then  # (a bare `want retry && ...` as the last line: exit 1 when retry is not asked for)
  t=$(timeout_for 570)
  if ((t == 0)); then skipped retry; else
    mkdir -p "$out/retry"
    timeout "$t" "$PY" benchmarks/bench_retry_pool.py --preset gemma-3-4b --images 1536 --batch-size 512 \
        --gather 64 --new-tokens 200 --flag-rate 0.03 --compile on --rounds 1 > "$out/retry/bench_retry_pool.log" 2>&1
    echo "bench_retry_pool exit $?" | tee -a "$out/gpu.txt"
    grep '^{' "$out/retry/bench_retry_pool.log" | cut -c1-1500
  fi
fi
