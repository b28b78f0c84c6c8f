#!/usr/bin/env bash
# Run the test suite from a fresh clone: sets up .venv if needed, then pytest (arguments are passed on,
# e.g. `bash experiments/test.sh -m "not full"` skips the full SD 1.5 shape tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash experiments/setup.sh
exec .venv/bin/python -m pytest "$@"
