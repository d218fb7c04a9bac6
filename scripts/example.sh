#!/usr/bin/env bash
# The main job on a bundled example: set up .venv, build a small checkpoint in the layout a
# quantizer exports (transformers' in-memory names), revert it to the hub layout, show the result.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python examples/revert_demo.py "$@"
