#!/usr/bin/env bash
# Set up t2vz from a fresh clone: a virtual environment in .venv, torch first (pinned, so pip does not pull a
# multi-GB CUDA build where a CPU wheel is wanted), then t2vz with its test extra. Re-running is a no-op unless
# pyproject.toml changed or other extras are asked for. TORCH_SPEC overrides the torch requirement (e.g. a CUDA
# build on a GPU machine); T2VZ_EXTRAS (comma-separated, default: test) chooses the extras, e.g. T2VZ_EXTRAS=app
# for the browser app alone (experiments/app.sh sets up and starts it).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=${T2VZ_EXTRAS:-test}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.t2vz-installed-${extras//,/-}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up .venv (torch, then t2vz[$extras]) ..." >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
  touch "$stamp"
fi
