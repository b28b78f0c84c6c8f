"""Video Instruct-Pix2Pix jobs: a video edited by an instruction, measured and logged like experiments/run.py;
`-m` sweeps, `+experiment=instruct/NAME -m` runs a declared sweep (conf/experiment/instruct/).

    python experiments/instruct_video.py instruction="make it winter" model=models/ip2p source.video=walk.mp4
    python experiments/instruct_video.py --help
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import t2vz.experiment.config  # noqa: F401  registers the shared configs with Hydra's ConfigStore
from t2vz.experiment.conditional_runs import INSTRUCT_VIDEO
from t2vz.experiment.run import run_experiment


@hydra.main(version_base="1.3", config_path="../conf", config_name="instruct_experiment")
def main(cfg: DictConfig) -> float:
    return run_experiment(cfg, INSTRUCT_VIDEO)


if __name__ == "__main__":
    main()
