"""`python -m t2vz prompt="a horse galloping on the street" model=MODEL_FOLDER`: one Hydra job = one video.

Compose (`t2vz.experiment.config`, checked before any model loads) → build and run
(`t2vz.experiment.run.generate_from_config`) → write the video, `config.yaml` and `run.json` into Hydra's output
folder (outputs/DATE/TIME/, or hydra.run.dir=PATH). With `image=FILE` (image-to-video) it also prints frame 1's
error against the picture (`run.image_metrics`, recorded in run.json). With `trace=true` it also writes `trace.png`
and `trace/`, the generation's intermediate states decoded and labelled (`method.trace.write_trace`).
`python -m t2vz --help` lists the options; `-m key=a,b` sweeps. Bad input ends with one line,
`t2vz: error: ...`, and exit code 2; in a sweep a failed point writes its error to `error.txt` in its folder and
the sweep goes on, ending with exit code 2 only if every point failed (`run.SweepFailures`).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .experiment.config import to_generate_config
from .experiment.run import (
    USER_ERRORS, check_model_folders, config_trace, generate_from_config, image_metrics, image_summary, record_failure,
    write_run,
)
from .method.trace import write_trace


@hydra.main(version_base="1.3", config_path=None, config_name="generate")
def main(cfg: DictConfig) -> str:
    start = time.perf_counter()
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        check_model_folders(cfg)  # the model first: values such as method.t1 are checked against it
        config = to_generate_config(cfg)
        trace = config_trace(config)  # with trace=true, the generation's intermediate states
        frames = generate_from_config(config, trace=trace)
        errors = image_metrics(frames, config)  # frame 1 against the picture, for image-to-video ({} otherwise)
        names = write_run(run_dir, frames, config, OmegaConf.to_yaml(cfg, resolve=True), start, errors)
        if trace is not None:
            names += write_trace(run_dir, trace)
        summary = image_summary(errors)
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            print(f"t2vz: error: {message}", file=sys.stderr)
            sys.exit(2)
        record_failure(run_dir, message)  # a sweep goes on; it fails at the end if every point failed
        print(f"t2vz: error: job {Path(run_dir).name} failed: {message}", file=sys.stderr)
        return None
    if summary:
        print(f"t2vz: {summary}")
    print(f"t2vz: wrote {', '.join(names)} to {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
