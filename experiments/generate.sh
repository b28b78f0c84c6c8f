#!/usr/bin/env bash
# Generate a video with Text2Video-Zero from a fresh clone (sets up .venv on first use). Usage:
#   bash experiments/generate.sh prompt="a horse galloping on the street" [model=DIR] [Hydra overrides ...]
# Without model=... it uses a *random-weight* tiny model (written to models/random-tiny on first use) at 128×128:
# the frames are noise that moves, which shows the whole method runs, not that it draws. Convert real SD 1.5
# weights with `python -m weights_convert` and pass model=DIR for real videos. Outputs: outputs/DATE/TIME/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash experiments/setup.sh
args=("$@")
if [[ " $* " != *" model="* ]]; then
  [ -f models/random-tiny/t2vz_model.json ] || .venv/bin/python -m weights_convert.random_model models/random-tiny
  args=(model=models/random-tiny video.height=128 video.width=128 "${args[@]}")
fi
exec .venv/bin/python -m t2vz "${args[@]}"
