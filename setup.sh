#!/usr/bin/env bash
# Creates ./vlm-caption (a venv) with everything the project needs. Safe to rerun:
# when requirements.txt has not changed since the last successful install it only checks.
set -euo pipefail
cd "$(dirname "$0")"

VENV=vlm-caption
PYTHON=${PYTHON:-python3}

die() { echo "setup.sh: error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.10-3.12 or set PYTHON=/path/to/python3.11"
"$PYTHON" - <<'PY' || die "Python 3.10-3.12 is required (img2dataset does not import on 3.13); set PYTHON=python3.11"
import sys
sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)
PY
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || die "the venv module is missing; install it (e.g. apt-get install python3-venv)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating venv ./$VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "Requirements already installed in ./$VENV (requirements.txt unchanged)"
else
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  echo "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
fi

"$VENV/bin/python" - <<'PY'
import torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "none"
print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}); CUDA visible: {cuda}; GPU: {name}")
PY
echo "Done. Activate with: source $VENV/bin/activate"
