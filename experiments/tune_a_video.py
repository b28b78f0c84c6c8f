"""Tune-A-Video jobs: a model tuned on one video, then that video edited by other prompts; the loss of every step
logged to W&B; `-m` sweeps.

    python experiments/tune_a_video.py source_video=walk.mp4 prompt="a man is walking" model=models/sd15 \
        'edit_prompts=["an astronaut is walking on the moon"]'
    python experiments/tune_a_video.py source_video=walk.mp4 model=models/sd15 \
        tuned=outputs/DATE/TIME/tuned.safetensors 'edit_prompts=["a panda is walking"]'
    python experiments/tune_a_video.py --help
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import t2vz.experiment.config  # noqa: F401  registers the shared configs with Hydra's ConfigStore
from t2vz.experiment.tune_runs import run_tune_experiment


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune_experiment")
def main(cfg: DictConfig) -> float:
    return run_tune_experiment(cfg)


if __name__ == "__main__":
    main()
