"""Train the toy CLIP (a small transformers CLIPModel) from scratch on the toy world's captioned renders.

    .venv/bin/python experiments/train_toy_clip.py                    # the shipped folder's recipe
    .venv/bin/python experiments/train_toy_clip.py steps=300 data.num_images=4000 out=models/clip-quick \
        workdir=runs/clip-quick                                       # a quick one elsewhere
    .venv/bin/python experiments/train_toy_clip.py augment.enabled=false   # renders as they are, no degradation

Stages (t2vz/toyworld/clip_training.py): render the dataset → contrastive training → fp16 CLIP folder at `out`
(default: the package's own `t2vz/data/clip/toyworld`), with `t2vz_clip.json` recording the command, the config,
the times and the zero-shot accuracies of the written weights on renders the training never saw. The training
checkpoints into `workdir`; run the same command again to resume. Logged to W&B offline by default
(`logger.mode=online` to upload). `--cfg job` prints every option with its default.
"""
from __future__ import annotations

import shlex
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from t2vz.toyworld.clip_training import ClipTrainConfig, check_config, train

ConfigStore.instance().store(name="train_toy_clip", node=ClipTrainConfig)


@hydra.main(version_base="1.3", config_path=None, config_name="train_toy_clip")
def main(cfg) -> None:
    command = "python experiments/train_toy_clip.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        config = OmegaConf.to_object(cfg)  # a ClipTrainConfig (logger settings checked on construction)
        check_config(config)  # a bad value is refused before anything is rendered
        out = train(config, command.strip(), OmegaConf.to_yaml(cfg))
    except ValueError as error:  # a bad setting, a stale checkpoint: say what and what to do, no traceback
        raise SystemExit(f"train_toy_clip: {error}") from None
    print(f"wrote the toy CLIP to {out}")


if __name__ == "__main__":
    main()
