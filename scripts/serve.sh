#!/usr/bin/env bash
# Set up if needed (scripts/setup.sh), then serve the embedded model with the shield on, on localhost:
# an OpenAI-compatible API at http://127.0.0.1:8000/v1 once it prints "kvshield: ready at ...". Ctrl-C stops it.
#
#   scripts/serve.sh [MODEL] [--mode MODE] [--key-file FILE] [vllm serve arguments...]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/kvshield" serve "$@"
