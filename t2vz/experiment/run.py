"""Build and run what a `GenerateConfig` describes, and write a run folder; `python -m t2vz` is a thin shell on this.

    start = time.perf_counter()
    config = GenerateConfig(prompt="a horse galloping on the street", model="models/sd15")   # checks its values
    frames = generate_from_config(config)                  # (f, h, w, 3), or (b, f, h, w, 3) for a batch
    write_run("out", frames, config, config_yaml, start)   # config_yaml: the composed config, as YAML

With `config.image` (image-to-video), `image_metrics` measures frame 1 against the picture; `write_run` records the
picture's file and sha256 and those errors in run.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from .. import __version__
from ..method.text2video_zero import TextToVideoZero
from ..method.trace import write_trace
from ..sd.loading import DTYPES
from ..sd.lora import file_sha256, lora_records, parse_lora_entries
from ..sd.model_folder import ModelFolderError, read_controlnet_config, read_model_config, resolve_model_path
from ..video_io import VideoIOError, load_image, to_uint8, write_npz, write_outputs, write_text
from .config import GenerateConfig, fill_method_defaults, to_generate_config
from .resume import Point

# Errors a user's input causes: the entry point reports them in one line (exit code 2), never as a traceback.
USER_ERRORS = (ValueError, ModelFolderError, VideoIOError, OSError)


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda if available, else cpu; anything else must name a torch device that exists here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device=cpu or device=auto")
    return resolved


def pipeline_kwargs(config: GenerateConfig) -> dict:
    """The `video`, `sampler`, `method` and `fast` fields and `output.progress` as keyword arguments of
    `TextToVideoZero.__call__` (the config's field names are its argument names)."""
    kwargs = {"progress": config.output.progress}
    for group in (config.video, config.sampler, config.method, config.fast):
        kwargs.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group)})
    return kwargs


def generate_from_config(config: GenerateConfig, pipe: TextToVideoZero | None = None, trace=None) -> torch.Tensor:
    """Load `config.model` (unless `pipe` is given) and generate: frames (f, h, w, 3) float in [0, 1], or
    (b, f, h, w, 3) when `video.num_videos_per_prompt` > 1. The seed fixes every random draw. With `config.image`,
    frame 1 is that picture (image-to-video, the pipeline's `image=`). `trace` (a `method.trace.Trace`) is filled
    in with the generation's intermediate states; None records nothing."""
    if pipe is None:
        pipe = load_pipeline(config.model, config.device, config.dtype, config.compile, tuple(config.lora))
    kwargs = pipeline_kwargs(config)
    if trace is not None:
        kwargs["trace"] = trace
    return pipe(config.prompt, generator=torch.Generator().manual_seed(config.seed), image=config.image, **kwargs)


def image_metrics(frames: torch.Tensor, config) -> dict[str, float]:
    """Image-to-video (`config.image`): frame 1 of the video (of every video of a batch) against the picture, resized
    to the video's size as the pipeline resizes it (`metrics.first_frame_error`: `first_frame_error`, mean |error| on
    the 0..255 scale, and `first_frame_psnr` in dB); {} for a config without an image."""
    image = getattr(config, "image", None)
    if image is None:
        return {}
    from .metrics import first_frame_error

    return first_frame_error(frames, load_image(image, "image"))


IMAGE_METRICS = ("first_frame_error", "first_frame_psnr")  # what `image_metrics` returns


def image_summary(metrics: dict[str, float]) -> str | None:
    """The line the job prints after an image-to-video run, e.g. `frame 1 vs image: mean |error| 5.1/255, PSNR
    31.2 dB`; None without those metrics."""
    if "first_frame_error" not in metrics:
        return None
    return (f"frame 1 vs image: mean |error| {metrics['first_frame_error']:.1f}/255, "
            f"PSNR {metrics['first_frame_psnr']:.1f} dB")


def write_run(folder: str | os.PathLike, frames: torch.Tensor, config: GenerateConfig, config_yaml: str,
              start: float, image_errors: dict[str, float] | None = None, extra: dict | None = None) -> list[str]:
    """Write a run folder: the video(s) (`{stem}.mp4`, `.gif`, `_sheet.png`; `{stem}_0.*`, `{stem}_1.*`, … for a
    batch (b, f, h, w, 3)), `config.yaml` (`config_yaml`, the resolved config) and `run.json` (versions, device,
    dtype, seed, each LoRA's file, sha256 and scale, the image's file and sha256 and `image_metrics` for an
    image-to-video run (`image_errors` where the caller measured them already), seconds since `start`, a
    `time.perf_counter()`, the video files' names, and `extra`: an experiment job's config hash and Slurm job,
    `resume.Point.run_info`). Every file is written atomically. Returns the names of the files written, in that
    order."""
    folder, out = Path(folder), config.output
    videos = [frames] if frames.ndim == 4 else list(frames)
    stems = [out.stem] if frames.ndim == 4 else [f"{out.stem}_{i}" for i in range(len(videos))]
    names = []
    for stem, video in zip(stems, videos):
        paths = write_outputs(folder, video, stem=stem, fps=out.fps, formats=tuple(out.formats))
        names += [p.name for p in paths.values()]
    write_text(folder / "config.yaml", config_yaml)
    info = {
        "t2vz": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": str(resolve_device(config.device)), "dtype": config.dtype, "seed": config.seed,
        "frames": list(frames.shape), "wall_s": round(time.perf_counter() - start, 3), "outputs": names,
    }
    if getattr(config, "lora", None):
        info["lora"] = lora_records(parse_lora_entries(config.lora))
    if getattr(config, "image", None) is not None:  # image-to-video: the picture, and frame 1's error against it
        info["image"] = {"file": str(config.image), "sha256": file_sha256(config.image)}
        info.update(image_metrics(frames, config) if image_errors is None else image_errors)
    if hasattr(config, "method"):  # text-to-video: the λ, t0, t1 used (the model's own where none was given)
        info["method"] = {k: getattr(config.method, k) for k in ("motion_strength", "t0", "t1")}
    info.update(extra or {})
    write_text(folder / "run.json", json.dumps(info, indent=2) + "\n")
    return names + ["config.yaml", "run.json"]


class OutputFolderCheck(Callback):
    """Hydra callback: an output folder that cannot be created ends the command with one line and exit code 2,
    before Hydra's own attempt would print a traceback."""

    def on_run_start(self, config, **kwargs) -> None:
        self.check(config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self.check(config.hydra.sweep.dir)

    @staticmethod
    def check(folder: str) -> None:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"t2vz: error: cannot create the output folder {folder}: {e.strerror or e}; "
                  "choose a writable hydra.run.dir (or hydra.sweep.dir for -m)", file=sys.stderr)
            sys.exit(2)


def check_model_folders(cfg) -> None:
    """The user's model (and ControlNet) folder, read before any value that depends on it is checked: a missing
    or wrong folder is the mistake to name first (ModelFolderError). No weights are read."""
    model = OmegaConf.select(cfg, "model", default=None, throw_on_missing=False)
    if isinstance(model, str):
        read_model_config(resolve_model_path(model))
    controlnet = OmegaConf.select(cfg, "controlnet", default=None, throw_on_missing=False)
    if isinstance(controlnet, str):
        read_controlnet_config(controlnet)


FAILURE_FILE = "error.txt"


def record_failure(job_dir: str | os.PathLike, message: str) -> None:
    """Mark a job of a `python -m t2vz` sweep as failed: its error message in `error.txt` in its folder."""
    write_text(Path(job_dir) / FAILURE_FILE, message + "\n")


class SweepFailures(Callback):
    """Hydra callback of `python -m t2vz`: a sweep whose every job failed (`record_failure`) exits with status 2,
    after all of them ran; one that has a job done exits 0, its failed points named in their folders."""

    def on_multirun_end(self, config, **kwargs) -> None:
        jobs = [p.parent.parent for p in Path(config.hydra.sweep.dir).glob("*/.hydra/overrides.yaml")]
        failed = [job for job in jobs if (job / FAILURE_FILE).is_file()]
        if jobs and len(failed) == len(jobs):
            print(f"t2vz: error: all {len(jobs)} jobs of the sweep failed (each folder's {FAILURE_FILE} says why)",
                  file=sys.stderr)
            sys.exit(2)


def compiled(pipe, compile_unet: bool):
    """`pipe` (any t2vz pipeline: its components are `pipe.sd`) with its UNet torch.compile'd when asked."""
    if compile_unet:
        pipe.sd.unet = torch.compile(pipe.sd.unet)
    return pipe


def load_pipeline(model: str, device: str, dtype: str, compile_unet: bool = False,
                  lora: tuple[str, ...] = ()) -> TextToVideoZero:
    """The pipeline for a config's model, device and dtype names and `lora` entries (FILE:SCALE); with compile_unet
    its UNet is torch.compile'd."""
    return compiled(TextToVideoZero.from_pretrained(model, device=resolve_device(device), dtype=DTYPES[dtype],
                                                    lora=parse_lora_entries(lora)), compile_unet)


@functools.lru_cache(maxsize=1)
def cached_pipeline(model: str, device: str, dtype: str, compile_unet: bool = False,
                    lora: tuple[str, ...] = ()) -> TextToVideoZero:
    """The pipeline of the last job: a sweep that runs its jobs in one process loads the model once."""
    return load_pipeline(model, device, dtype, compile_unet, lora)


def cached_scorer(name: str, device: str):
    """The CLIP scorer of `metrics.clip`: `toyworld`, the toy CLIP that ships with t2vz (`metrics.toy_clip_dir`),
    else a transformers CLIPModel folder or hub id; loaded once per process (a sweep's jobs share it). The toy CLIP
    missing from this installation, or a path that is not a folder, is a ValueError saying what to give instead."""
    from .config import TOY_CLIP
    from .metrics import toy_clip_dir

    if name == TOY_CLIP and not (toy_clip_dir() / "config.json").is_file():
        raise ValueError(f"metrics.clip={TOY_CLIP}: the toy CLIP is not in this installation ({toy_clip_dir()} has "
                         "no config.json); set metrics.clip=FOLDER (a transformers CLIPModel folder) or "
                         "metrics.clip=null (no CLIP metrics, with a metrics.headline that is not one)")
    if name != TOY_CLIP and not Path(name).exists() and (Path(name).is_absolute() or name.startswith(".")):
        raise ValueError(f"metrics.clip={name} is not a folder; name a transformers CLIPModel folder, "
                         f"metrics.clip={TOY_CLIP} (the toy CLIP that ships with t2vz) or metrics.clip=null")
    return _loaded_scorer(name, device)


@functools.lru_cache(maxsize=1)
def _loaded_scorer(name: str, device: str):
    from .config import TOY_CLIP
    from .metrics import ClipScorer, toy_clip_dir

    path = toy_clip_dir() if name == TOY_CLIP else name
    return ClipScorer.from_pretrained(path, device=resolve_device(device), name=name)


def measure(frames: torch.Tensor, config: GenerateConfig, clip_model: str | None, toyworld: bool = False,
            text: str | None = None) -> dict[str, float]:
    """`metrics.video_metrics` of one video (f, h, w, 3), or the mean over a batch (b, f, h, w, 3), with the CLIP
    score against `text` (default: `config.prompt`) by the CLIP model `clip_model` (`cached_scorer`; None: no CLIP
    metrics); on the toy model (`toyworld`) also its judge's metrics
    (`toyworld.judge.judge_video`): text faithfulness, appearance consistency, motion error against what λ and δ
    ask for; with `config.image` (image-to-video) also frame 1's error against the picture (`image_metrics`)."""
    from .metrics import video_metrics

    scorer = cached_scorer(clip_model, config.device) if clip_model else None
    videos = frames if frames.ndim == 5 else [frames]
    per_video = [video_metrics(video, config.prompt if text is None else text, scorer) for video in videos]
    if toyworld:
        from ..toyworld.world import parse_caption
    if toyworld and parse_caption(config.prompt)[0]:  # a prompt with no coloured shape: nothing to judge
        from ..toyworld.judge import judge_video, requested_motion

        h, w = videos[0].shape[1:3]
        requested = requested_motion(config.method.motion_strength, config.method.direction, h, w)
        for m, video in zip(per_video, videos):
            m.update(judge_video(video, config.prompt, requested))
    means = {key: sum(m[key] for m in per_video) / len(per_video) for key in per_video[0]}
    return {**means, **image_metrics(frames, config)}  # frame 1 of every video, pooled, as run.json has it


@dataclass(frozen=True)
class Task:
    """What one experiment job runs: `to_config` turns the composed config into its checked dataclass (ValueError on
    a bad value, before any model loads); `load(config)` loads (or finds cached) what `generate` runs, so that the
    job's `generate_s` metric times the generation alone; `generate(config)` returns frames (f, h, w, 3) or
    (b, f, h, w, 3) and the loaded components (text-to-video's also takes `trace=`, `config_trace(config)`);
    `measure(frames, config, sd)` returns the job's metrics."""

    to_config: Callable[[Any], Any]
    generate: Callable[[Any], tuple[torch.Tensor, Any]]
    measure: Callable[[torch.Tensor, Any, Any], dict[str, float]]
    load: Callable[[Any], Any] = lambda config: None


def config_trace(config):
    """The `method.trace.Trace` a config's `trace=true` asks for, None without it (a config with no `trace` key,
    the conditional jobs', too): its attention point on the toy world's subject (`toyworld.judge.subject_region`),
    as `python -m t2vz`, the app and docs/method.md's figures place it."""
    if not getattr(config, "trace", False):
        return None
    from ..method.trace import Trace
    from ..toyworld.judge import subject_region

    return Trace(subject=subject_region)


def _generate_text_to_video(config: GenerateConfig, trace=None) -> tuple[torch.Tensor, Any]:
    pipe = cached_pipeline(config.model, config.device, config.dtype, config.compile, tuple(config.lora))
    return generate_from_config(config, pipe, trace=trace), pipe.sd


def _measure_text_to_video(frames: torch.Tensor, config, sd) -> dict[str, float]:
    return measure(frames, config, config.metrics.clip_name, sd.config.get("variant") == "toyworld")


TEXT_TO_VIDEO = Task(to_generate_config, _generate_text_to_video, _measure_text_to_video,
                     load=lambda c: cached_pipeline(c.model, c.device, c.dtype, c.compile, tuple(c.lora)))


def job_start(cfg):
    """What every experiment job starts from: (its run folder, its metrics.json record so far, its W&B settings).
    The record holds the job's overrides and status "ok"; an invalid logger config gives W&B off here, and the job
    then fails on it with its other checks."""
    from hydra.core.hydra_config import HydraConfig

    from .tracking import LoggerConfig

    hydra_cfg = HydraConfig.get()
    record: dict = {"overrides": list(hydra_cfg.overrides.task), "status": "ok"}
    try:
        logger = OmegaConf.to_object(cfg.logger)
    except Exception:  # an invalid logger config fails the job below, with the other checks
        logger = LoggerConfig(enabled=False)
    return Path(hydra_cfg.runtime.output_dir), record, logger


def job_run_id() -> str:
    """The running Hydra job's W&B run id (`resume.point_run_id`): from the sweep folder and the job's overrides
    in a multirun, from the run folder in a single run."""
    from hydra.core.hydra_config import HydraConfig

    from .resume import point_run_id
    from .tracking import hydra_sweep_dir

    hydra_cfg = HydraConfig.get()
    return point_run_id(hydra_cfg.runtime.output_dir, hydra_sweep_dir(), list(hydra_cfg.overrides.task))


def run_experiment(cfg, task: Task = TEXT_TO_VIDEO) -> float:
    """One Hydra job of `experiments/run.py` (or of another `task`'s entry point): generate, write the run folder,
    measure, log to W&B.

    Writes `metrics.json` (metrics, the job's overrides, status "ok"/"failed", error) in every case: a job whose
    input is bad is recorded as failed and returns NaN, so the other points of a sweep still run; a single job
    (no -m) that failed exits with status 2. A sweep whose jobs all failed exits 2 (`tracking.MultirunSummary`).

    A point whose folder holds complete outputs of the same config is skipped, its files untouched, and returns its
    recorded headline (`resume.Point`; `resume=false` runs it again). Its W&B run id is `job_run_id()`, so a
    rerun, requeued or resumed point continues one W&B run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .tracking import Tracker

    start = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    run_dir, record, logger = job_start(cfg)
    fill_method_defaults(cfg)  # the model's own λ, t0, t1 where null, so config.yaml and W&B show what ran
    traced = bool(OmegaConf.select(cfg, "trace", default=False))  # trace=true: trace.png belongs to the point too
    point = Point(cfg, run_dir, also=("frames.npz", "trace.png") if traced else ("frames.npz",))
    skipped = point.skip_or_begin(record, OmegaConf.select(cfg, "metrics.headline", default=None))
    if skipped is not None:  # complete already: skipped, its files untouched
        return skipped
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    headline = float("nan")
    with Tracker(logger, run_dir, OmegaConf.to_container(cfg, resolve=True), name=run_dir.name,
                 run_id=job_run_id()) as tracker:
        try:
            check_model_folders(cfg)
            config = task.to_config(cfg)
            task.load(config)
            trace = config_trace(config)  # trace=true: the generation's intermediate states (text-to-video)
            generate_start = time.perf_counter()
            frames, sd = task.generate(config) if trace is None else task.generate(config, trace=trace)
            generate_s = time.perf_counter() - generate_start  # the speed axis (ablate_speed); tracing included
            metrics = task.measure(frames, config, sd)  # before writing: a job that fails leaves no video
            metrics["generate_s"] = generate_s
            if getattr(config, "metrics", None) is not None and config.metrics.clip_name:
                record["clip_model"] = config.metrics.clip_name  # which CLIP model the CLIP metrics are from
            if config.metrics.headline not in metrics:
                raise ValueError(f"metrics.headline={config.metrics.headline!r} is not one of {sorted(metrics)}")
            names = write_run(run_dir, frames, config, config_yaml, start,
                              {k: metrics[k] for k in IMAGE_METRICS if k in metrics} or None, point.run_info())
            write_npz(run_dir / "frames.npz", {"frames": to_uint8(frames)}, compressed=True)
            if trace is not None:
                write_trace(run_dir, trace)
                tracker.log_image("trace", run_dir / "trace.png")
            record.update(metrics)
            tracker.log_metrics(metrics)
            stem = config.output.stem if frames.ndim == 4 else f"{config.output.stem}_0"
            if f"{stem}.mp4" in names:
                tracker.log_video(run_dir / f"{stem}.mp4")
            tracker.log_image("contact_sheet", run_dir / f"{stem}_sheet.png")
            if getattr(config, "image", None) is not None:  # image-to-video: the picture frame 1 started from
                tracker.log_image("image", config.image)
            headline = metrics[config.metrics.headline]
        except USER_ERRORS as e:
            record.update(status="failed", error=" ".join(str(e).split()) or type(e).__name__)
            tracker.fail(record["error"])
            print(f"t2vz: job {run_dir.name} failed: {record['error']}", file=sys.stderr)
    write_text(run_dir / "metrics.json", json.dumps(record, indent=2) + "\n")
    point.end(record["status"])
    if record["status"] == "ok":
        if image_summary(record):
            print(f"t2vz: job {run_dir.name}: {image_summary(record)}")
        print(f"t2vz: job {run_dir.name} ok, {cfg.metrics.headline}={headline:.4g}; results in {run_dir}")
    elif hydra_cfg.mode == RunMode.RUN:  # a single job that failed: exit 2, so a script can tell
        sys.exit(2)
    return headline
