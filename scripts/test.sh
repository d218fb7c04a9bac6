#!/usr/bin/env bash
# The whole test suite, in .venv, with the optional extras the differential tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,transformers,reload
exec .venv/bin/python -m pytest -q "$@"
