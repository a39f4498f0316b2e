#!/usr/bin/env bash
# Run KV-Cloak's published attack code (github SiO-2/kvcloak: attack/inversion.py, attack/collision.py) on KV
# blocks dumped from our engine (`kvshield attack --kvcloak-dump DIR`), in a virtualenv of its own with its pins.
# Its code is never part of this repository: give the path of a checkout.
#
#   .venv/bin/kvshield attack --modes none,permute,mix-v,mix --kvcloak-dump /tmp/kvcloak-dumps --out /tmp/attack
#   scripts/kvcloak_attack.sh /path/to/kvcloak /tmp/kvcloak-dumps > benchmarks/results/kvcloak.json
#
# Pins: transformers 4.51.1 (KV-Cloak's requirements.txt), tqdm, numpy, scipy; torch is this project's CPU wheel
# (scripts/requirements.lock): KV-Cloak pins torch 2.6.0, whose PyPI wheel is a CUDA build. KVCLOAK_VENV moves
# the virtualenv (default .venv-kvcloak in the repository). KVSHIELD_MODEL: the checkpoint (default: ours).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECKOUT="${1:?usage: kvcloak_attack.sh KVCLOAK_CHECKOUT DUMP_DIR [COLLISION_LAYER]}"
DUMPS="${2:?usage: kvcloak_attack.sh KVCLOAK_CHECKOUT DUMP_DIR [COLLISION_LAYER]}"
LAYER="${3:-0}"
VENV="${KVCLOAK_VENV:-$ROOT/.venv-kvcloak}"
PYTHON="${PYTHON:-python3.11}"

for f in attack/inversion.py attack/collision.py; do
  [ -f "$CHECKOUT/$f" ] || { echo "kvcloak_attack: $CHECKOUT/$f not found (a checkout of github SiO-2/kvcloak?)" >&2; exit 1; }
done
TORCH="$(grep -E '^torch==' "$ROOT/scripts/requirements.lock")"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import transformers, scipy, tqdm; assert transformers.__version__ == '4.51.1'" 2>/dev/null; then
  echo "kvcloak_attack: making $VENV (transformers==4.51.1, $TORCH)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH" "transformers==4.51.1" "tqdm==4.67.1" numpy scipy >&2
fi
MODEL="${KVSHIELD_MODEL:-$("$ROOT/.venv/bin/kvshield" model-path)}"
exec "$VENV/bin/python" "$ROOT/scripts/kvcloak_run.py" --kvcloak "$CHECKOUT" --dumps "$DUMPS" --model "$MODEL" --collision-layer "$LAYER"
