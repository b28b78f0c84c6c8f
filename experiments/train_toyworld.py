"""Train the embedded toy model (`model=toyworld`) from scratch on the procedural toy world.

    .venv/bin/python experiments/train_toyworld.py                      # the shipped model's recipe
    .venv/bin/python experiments/train_toyworld.py unet.steps=500 out=models/toy-quick workdir=runs/toy-quick
    .venv/bin/python experiments/train_toyworld.py workdir=runs/toy-grow out=models/toy-grow \
        'unet.grow.levels=[true,false,false]' unet.grow.steps=1500   # then attention at 16×16 too (stage 3b)

Stages (t2vz/toyworld/training.py): render the dataset → VAE → UNet + CLIP text transformer → fp16 model folder at
`out` (default: the package's own `t2vz/data/models/toyworld`). Every stage checkpoints into `workdir`; run the
same command again to resume. Logged to W&B offline by default (`logger.mode=online` to upload, `logger=` keys as
in experiments/run.py). `--cfg job` prints every option with its default.
"""
from __future__ import annotations

import shlex
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from t2vz.toyworld.training import TrainConfig, train

ConfigStore.instance().store(name="train_toyworld", node=TrainConfig)


@hydra.main(version_base="1.3", config_path=None, config_name="train_toyworld")
def main(cfg) -> None:
    config = OmegaConf.to_object(cfg)  # a TrainConfig, its values checked by the dataclasses
    command = "python experiments/train_toyworld.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        out = train(config, command.strip(), OmegaConf.to_yaml(cfg))
    except ValueError as error:  # a stale checkpoint, a bad setting: say what and what to do, no traceback
        raise SystemExit(f"train_toyworld: {error}") from None
    print(f"wrote the toy model to {out}")


if __name__ == "__main__":
    main()
