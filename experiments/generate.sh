#!/usr/bin/env bash
# Generate a video with Text2Video-Zero from a fresh clone (sets up .venv on first use). Usage:
#   bash experiments/generate.sh prompt="a red circle on grass" [model=DIR] [Hydra overrides ...]
# Without model=... it uses the toy model that ships with t2vz (`toyworld`: SD 1.5's architecture, small, trained
# on a procedural world of coloured shapes, 64×64). Convert real SD 1.5 weights with `python -m weights_convert`
# and pass model=DIR for real videos. Outputs: outputs/DATE/TIME/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash experiments/setup.sh
exec .venv/bin/python -m t2vz "$@"
