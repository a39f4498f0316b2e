#!/usr/bin/env bash
# Set up if needed (scripts/setup.sh), then run the whole test suite on the real model and real vLLM engines.
#
#   scripts/test.sh [pytest arguments...]     # e.g. scripts/test.sh tests/test_cli.py -x
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -v -ra --durations=40 "$@"
