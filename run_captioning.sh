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

usage() {
  cat <<'EOF'
Usage: ./run_captioning.sh --demo [--demo-dir DIR] [--n N]
       ./run_captioning.sh [batched_image_inference.py flags]

  --demo            run the whole pipeline offline: a tiny random-weight Gemma 3, a synthetic sample,
                    captioning, merge and DIR/preview.html (its captions are noise). Reruns reuse the
                    model and data and resume.
  --demo-dir DIR    where the demo writes (default: ./demo)
  --n N             rows of the demo's sample data (default: 24, at least 8; another N needs another --demo-dir)

Any other flags go to batched_image_inference.py unchanged: its common flags are listed below,
--help-all lists every one. The venv ./vlm-caption is created with ./setup.sh on first use (about 1-3 minutes).
EOF
}

demo=0
help=0
args=()
for arg in "$@"; do
  case "$arg" in
    --demo) demo=1 ;;
    -h|--help|--help-all) help=1; args+=("$arg") ;;
    *) args+=("$arg") ;;
  esac
done

if [ "$demo" = 0 ] && [ "$help" = 0 ]; then  # the demo's own flags alone: say so, not "unrecognized arguments"
  for arg in ${args[@]+"${args[@]}"}; do
    case "$arg" in
      --demo-dir|--demo-dir=*|--n|--n=*)
        echo "run_captioning.sh: error: ${arg%%=*} is a flag of --demo: add --demo (see ./run_captioning.sh --help)" >&2
        exit 2 ;;
    esac
  done
fi

if [ "$help" = 1 ] && { [ "$demo" = 0 ] || [ ! -x "$PY" ]; }; then
  usage
  echo
  if [ ! -x "$PY" ]; then
    echo "(No venv yet: ./setup.sh creates it; then --help also lists batched_image_inference.py's flags.)"
    exit 0
  fi
  echo "batched_image_inference.py flags:"
fi

stamp="$HERE/vlm-caption/.requirements.sha256"  # setup.sh writes it once every requirement is installed
if [ "$help" = 1 ]; then
  :  # --help only prints (the venv exists here): it never installs anything
elif [ ! -x "$PY" ]; then
  echo "run_captioning.sh: no venv at $HERE/vlm-caption yet; creating it with setup.sh (about 1-3 minutes, once)" >&2
  "$HERE/setup.sh"
elif [ "$(cat "$stamp" 2>/dev/null)" != "$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)" ] ||
     ! compgen -G "$HERE/vlm-caption/lib/python3*/site-packages/vlm_caption_checkout.pth" >/dev/null; then
  # (the .pth, which lets `python -m vlm_caption.*` run from any directory, came with a later setup.sh)
  echo "run_captioning.sh: the venv's install is unfinished, older than setup.sh, or requirements.txt changed;" \
       "running setup.sh" >&2
  "$HERE/setup.sh"
fi

if [ "$demo" = 1 ]; then
  # `python -m` looks for the package in the working directory, which we keep: point it at the repo.
  export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PY" -m vlm_caption.demo ${args[@]+"${args[@]}"}
fi
exec "$PY" "$HERE/batched_image_inference.py" ${args[@]+"${args[@]}"}
