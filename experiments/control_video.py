"""ControlVideo jobs: a video that follows a control video (edges, pose, depth), measured and logged like
experiments/run.py; `-m` sweeps, `+experiment=control/NAME -m` runs a declared sweep (conf/experiment/control/).

    python experiments/control_video.py prompt="an astronaut dancing" model=models/sd15 \
        controlnet=models/cn-canny control.video=dance.mp4 control.detector=canny
    python experiments/control_video.py --help
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import t2vz.experiment.config  # noqa: F401  registers the shared configs with Hydra's ConfigStore
from t2vz.experiment.conditional_runs import CONTROL_VIDEO
from t2vz.experiment.run import run_experiment


@hydra.main(version_base="1.3", config_path="../conf", config_name="control_experiment")
def main(cfg: DictConfig) -> float:
    return run_experiment(cfg, CONTROL_VIDEO)


if __name__ == "__main__":
    main()
