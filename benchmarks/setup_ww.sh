#!/usr/bin/env bash
# The benchmark's own environment for WeightWatcher (not the project's venv, no system site
# packages): .cache/bench-venv with weightwatcher 0.7.7, powerlaw 1.5 and their dependencies, and a
# CPU build of torch (2.13.0+cpu where a local wheel exists, else torch==2.14.1 from PyPI).
#   bash benchmarks/setup_ww.sh        (idempotent; PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.cache/bench-venv
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if [ -f "$VENV/.ready" ]; then exit 0; fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
$PIP install -U pip
# torch first, so that weightwatcher's resolver keeps it (a CPU wheel: no CUDA libraries).
$PIP install "torch==2.13.0+cpu" 2>/dev/null || $PIP install "torch==2.14.1"
# powerlaw 1.5: the version whose fits WeightWatcher's fix_fingers / TPL use here and that this
# project reproduces (2.x caps alpha at 3); benchmarks/ww_golden.py refuses any other
$PIP install weightwatcher==0.7.7 powerlaw==1.5 safetensors psutil
"$VENV/bin/python" -c "import weightwatcher, torch; print('weightwatcher', weightwatcher.__version__, 'torch', torch.__version__)"
touch "$VENV/.ready"
