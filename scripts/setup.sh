#!/usr/bin/env bash
# Create .venv (Python 3.11) and install convlens into it with the given extras.
# Usage: scripts/setup.sh [EXTRAS]     e.g. scripts/setup.sh test,transformers
# A CPU build of torch is installed first (TORCH_SPEC overrides it): a bare `pip install torch`
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  echo "convlens: creating .venv with $("$python" --version 2>&1)" >&2
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "convlens: installing ${TORCH_SPEC:-torch==2.13.0} (CPU)" >&2
  "${pip[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
echo "convlens: installing $target" >&2
"${pip[@]}" install -e "$target"
