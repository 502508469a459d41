#!/usr/bin/env bash
# README command 1: the development stack in one command (see scripts/devstack.py run --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
[ -n "$PYTHON" ] || { echo "run.sh: Python 3.11 (python3.11 or python3) is not on PATH" >&2; exit 1; }
_FREEAGENTICS_PROG="$0" exec "$PYTHON" scripts/devstack.py run "$@"
