#!/usr/bin/env bash
# README command 2: the test suite against real PostgreSQL and Redis; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
[ -n "$PYTHON" ] || { echo "test.sh: Python 3.11 (python3.11 or python3) is not on PATH" >&2; exit 1; }
_FREEAGENTICS_PROG="$0" exec "$PYTHON" scripts/devstack.py test "$@"
