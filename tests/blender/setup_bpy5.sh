#!/usr/bin/env bash
# Creates the Blender 5.x test environment for `./dev.sh test tests/blender -m blender5`: a Python 3.13 venv (Blender
# 5.1+ runs Python 3.13) with the PyPI bpy 5.x module, the engine's dependencies and near_engine (editable).
#   tests/blender/setup_bpy5.sh            -> ~/.cache/near/bpy5-venv (override with NEAR_BPY5_VENV)
# Python 3.13 is taken from $PYTHON313, else pyenv's newest 3.13, else python3.13 on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${NEAR_BPY5_VENV:-$HOME/.cache/near/bpy5-venv}
PYTHON=${PYTHON313:-}
if [ -z "$PYTHON" ] && command -v pyenv >/dev/null 2>&1; then
    version=$(pyenv versions --bare | grep -E '^3\.13(\.|$)' | sort -V | tail -1 || true)
    [ -n "$version" ] && PYTHON="$(pyenv root)/versions/$version/bin/python3.13"
fi
PYTHON=${PYTHON:-python3.13}
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 13), sys.version' || {
    echo "setup_bpy5.sh: Python 3.13 not found; set PYTHON313=/path/to/python3.13" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "bpy>=5.1,<6" "torch>=2.4" "numpy>=1.24" "numba>=0.59" "OpenEXR>=3.2" \
    "safetensors>=0.4" "Pillow>=10" "PyYAML>=6" "plyfile>=1.0" "pytest>=8" "pytest-timeout>=2.3"
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -c 'import bpy, torch, numba; print("bpy", bpy.app.version_string, "torch", torch.__version__)'
