#!/usr/bin/env bash
# Set up t2vz with the app extra (experiments/setup.sh) and start the browser app on http://127.0.0.1:7860,
# on the toy model that ships with t2vz and the converted folders under models/. Arguments go to t2vz-app:
#   bash experiments/app.sh --models models --port 7860      (docs/app.md: every option, and what --share exposes)
set -euo pipefail
cd "$(dirname "$0")/.."
T2VZ_EXTRAS=${T2VZ_EXTRAS:-app} bash experiments/setup.sh
exec .venv/bin/t2vz-app "$@"
