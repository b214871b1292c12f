#!/usr/bin/env bash
# Creates ./vlm-caption (a venv) with everything the project needs. Safe to rerun:
# when requirements.txt has not changed since the last successful install it only checks.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./setup.sh [--help]

Creates the venv ./vlm-caption next to this script and installs requirements.txt into it (torch,
transformers, img2dataset, datasets, huggingface_hub, ...). The first install takes about 1-3 minutes
on a fast connection (longer with CUDA torch wheels); pip prints what it downloads as it goes. A rerun
with requirements.txt unchanged only checks (seconds).
It also puts this checkout on the venv's import path, so `python -m vlm_caption.preview` and the other
modules work from any directory.

Environment: PYTHON=/path/to/python3.11 picks the interpreter (Python 3.10-3.12; default: python3).
Afterwards: source vlm-caption/bin/activate   (or run ./run_captioning.sh, which uses the venv itself)
EOF
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) echo "setup.sh: error: unknown argument $1 (it takes none; see ./setup.sh --help)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")"

VENV=vlm-caption
PYTHON=${PYTHON:-python3}
started=$SECONDS

die() { echo "setup.sh: error: $*" >&2; exit 1; }
step() { echo "setup.sh: [$1/4] $2"; }

step 1 "checking the Python interpreter ($PYTHON)"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.10-3.12 or set PYTHON=/path/to/python3.11"
"$PYTHON" - <<'PY' || die "Python 3.10-3.12 is required (img2dataset does not import on 3.13); set PYTHON=python3.11"
import sys
sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)
PY
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || die "the venv module is missing; install it (e.g. apt-get install python3-venv)"

if [ ! -x "$VENV/bin/python" ]; then
  step 2 "creating the venv ./$VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
else
  step 2 "the venv ./$VENV exists"
fi

stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  step 3 "requirements already installed in ./$VENV (requirements.txt unchanged)"
else
  step 3 "installing requirements.txt into ./$VENV: about 1-3 minutes the first time (pip's progress follows)"
  pip_failed="pip could not install the requirements (no network, a proxy, or PIP_INDEX_URL?); the venv is incomplete: fix that and rerun ./setup.sh"
  "$VENV/bin/python" -m pip install --upgrade pip || die "$pip_failed"
  "$VENV/bin/python" -m pip install -r requirements.txt || die "$pip_failed"
  echo "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
fi

# This checkout on the venv's import path (a .pth file), so `python -m vlm_caption.*` works from anywhere.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site/vlm_caption_checkout.pth"

step 4 "checking torch (the first import takes a few seconds)"
"$VENV/bin/python" - <<'PY'
import torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "none"
print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}); CUDA visible: {cuda}; GPU: {name}")
PY
echo "Done in $((SECONDS - started)) s. Activate with: source $VENV/bin/activate   (or use ./run_captioning.sh)"
