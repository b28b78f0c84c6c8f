"""One experiment job: generate a video, measure it, log it; `-m` runs a sweep, one job per point.

    python experiments/run.py prompt="a horse galloping on the street" model=models/sd15
    python experiments/run.py +experiment=ablate_lambda model=models/sd15 -m       # the sweep the file declares
    python experiments/run.py -m prompt="a red circle on grass" image=a.png,b.png  # image-to-video, per picture

Every job writes into its Hydra folder: the video (mp4, gif, contact sheet), `frames.npz` (uint8 frames),
`config.yaml`, `run.json` and `metrics.json` (the metrics, the job's overrides, `status` ok/failed and the
error; with `image=`, frame 1's error against the picture, `first_frame_error` and `first_frame_psnr`; with
`trace=true`, `trace.png` and `trace/`), and logs them to W&B (`logger.mode=offline|online|disabled`, default:
WANDB_MODE; the picture too). A failing job is recorded as failed and the sweep goes on; the sweep's end writes
`summary.csv` and a W&B summary table.
The job returns `metrics.headline` (NaN when it failed), for sweepers that optimise.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import t2vz.experiment.config  # noqa: F401  registers the configs with Hydra's ConfigStore
from t2vz.experiment.run import run_experiment


@hydra.main(version_base="1.3", config_path="../conf", config_name="experiment_config")
def main(cfg: DictConfig) -> float:
    return run_experiment(cfg)


if __name__ == "__main__":
    main()
