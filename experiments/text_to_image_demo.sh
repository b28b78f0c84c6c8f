#!/usr/bin/env bash
# Generate one image from a prompt, from a fresh clone. Usage:
#   bash experiments/text_to_image_demo.sh "a photo of a cat" [--model DIR] [other t2vz-text-to-image options]
# Without --model it uses a *random-weight* tiny model (written to models/random-tiny on first use): the image is
# noise and only shows that the stack runs. Convert real SD 1.5 weights with `python -m weights_convert` and
# pass --model to get a real picture.
set -euo pipefail
cd "$(dirname "$0")/.."
bash experiments/setup.sh
args=("$@")
if [[ " $* " != *" --model "* ]]; then
  [ -f models/random-tiny/t2vz_model.json ] || .venv/bin/python -m weights_convert.random_model models/random-tiny
  args+=(--model models/random-tiny --height 64 --width 64 --steps 10 --out outputs/image.png)
fi
exec .venv/bin/t2vz-text-to-image "${args[@]}"
