#!/usr/bin/env bash
# One entry point for developers and CI. Creates (or reuses) .venv with the exact versions in requirements.lock,
# installs near_engine into it (editable), then runs:
#   ./dev.sh demo [near demo options]   the main job on embedded defaults (images in out/demo/)
#   ./dev.sh test [pytest options]      the test suite
#   ./dev.sh near ARGS...               any `near` command
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "dev.sh: Python 3.11 is required (bpy 4.5 LTS is built for it); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ] || ! cmp -s requirements.lock "$VENV/.installed.lock" \
        || ! cmp -s pyproject.toml "$VENV/.installed.pyproject"; then
    echo "dev.sh: setting up $VENV (pinned versions from requirements.lock) ..." >&2
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet -r requirements.lock
    "$VENV/bin/python" -m pip install --quiet --no-deps -e .
    cp requirements.lock "$VENV/.installed.lock"
    cp pyproject.toml "$VENV/.installed.pyproject"
fi

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    demo) exec "$VENV/bin/near" demo "$@" ;;
    test) exec "$VENV/bin/python" -m pytest "$@" ;;
    near) exec "$VENV/bin/near" "$@" ;;
    *) echo "usage: ./dev.sh demo|test|near [args...]" >&2; exit 2 ;;
esac
