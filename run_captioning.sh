#!/usr/bin/env bash
# Caption with the project's venv (created with ./setup.sh on first use); every flag goes to
# batched_image_inference.py unchanged.
#   ./run_captioning.sh --max-images 100 --no-push
#   ./run_captioning.sh --model google/gemma-3-4b-it --resume
#   ./run_captioning.sh --demo [--demo-dir DIR]    # whole pipeline offline: tiny random model, sample data
# Works from any directory: relative paths you pass (--data-dir, --checkpoint-dir, ...) keep meaning what
# they mean where you are, so this script never changes directory.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$HERE/vlm-caption/bin/python"

if [ ! -x "$PY" ]; then
  echo "run_captioning.sh: no venv at $HERE/vlm-caption yet; creating it with setup.sh (a few minutes, once)" >&2
  "$HERE/setup.sh"
fi

demo=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--demo" ]; then demo=1; else args+=("$arg"); fi
done

if [ "$demo" = 1 ]; then
  # `python -m` looks for the package in the working directory, which we keep: point it at the repo.
  export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PY" -m vlm_caption.demo ${args[@]+"${args[@]}"}
fi
exec "$PY" "$HERE/batched_image_inference.py" ${args[@]+"${args[@]}"}
