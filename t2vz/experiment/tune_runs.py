"""The Tune-A-Video job (`experiments/tune_a_video.py`): tune a model on one video, then edit that video.

    python experiments/tune_a_video.py source_video=walk.mp4 prompt="a man is walking" model=models/sd15 \
        'edit_prompts=["an astronaut is walking on the moon","a man is walking, van gogh style"]'
    python experiments/tune_a_video.py source_video=walk.mp4 model=models/sd15 \
        tuned=outputs/DATE/TIME/tuned.safetensors 'edit_prompts=["a panda is walking"]'    # no tuning

The source video's key is `source_video`, not `video`: `video` (like `source`) is a config group of the other
entry points in the same ConfigStore (`video.num_frames` of `python -m t2vz`), and Hydra reads `video=FILE` as the
choice of an option of that group.

One dataclass per config node, registered with Hydra's ConfigStore (`tune_experiment`, its `tune` group and the
`sampler` option `tune`); `__post_init__` checks values before any model loads. The job reads the video, loads the
model (with `tuned` weights, if given), tunes (`method.tune_a_video.tune`, the loss of every step logged to W&B),
edits the video once per edit prompt, and only then writes, each file atomically, into its Hydra folder:
`tuned.safetensors` (the trained tensors, the base model's name and hash; not when `tuned` was given),
`video_0.mp4`, `video_0.gif`, `video_0_sheet.png`, … (one video per edit prompt, in their order), `config.yaml`,
`run.json` (versions, device, seed, the losses, the edit prompts and their files) and `metrics.json` (the losses,
the seconds, and Tune-A-Video's textual faithfulness and frame consistency of the edits by `metrics.clip`, its
name as `clip_model`: `edit_metrics`). Bad input
(a video that is not one or is too short, weights of another base model, an unknown trainable module, a bad
number) ends the job with one line, `t2vz: error: ...`, and exit code 2, with no video or weights written.
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .. import __version__
from ..method.tune_a_video import TRAINABLE, TuneAVideo
from ..video_io import load_frames, write_outputs, write_text
from .conditional_runs import check_resolution, to_config
from .config import HYDRA_HELP_TAIL, MetricsConfig, OutputConfig, SamplerConfig, check_int, option_lines
from .resume import Point
from .run import USER_ERRORS, check_model_folders, job_run_id, job_start, resolve_device
from .tracking import LoggerConfig, Tracker

TUNED_FILE = "tuned.safetensors"


def check_positive(key: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")


@dataclass
class TuneConfig:
    """One-shot tuning (the authors' settings: 500 steps of AdamW at 3e-5, the queries of self- and cross-attention
    and the temporal attention trained, gradients clipped to norm 1)."""

    steps: int = 500
    lr: float = 3e-5
    trainable: list[str] = field(default_factory=lambda: list(TRAINABLE))  # module name suffixes that learn
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_int("tune.steps", self.steps, 1)
        check_positive("tune.lr", self.lr)
        check_positive("tune.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("tune.max_grad_norm", self.max_grad_norm)
        if not self.trainable or not all(isinstance(n, str) and n.strip() for n in self.trainable):
            raise ValueError(f"tune.trainable={list(self.trainable)!r} must be a non-empty list of module name "
                             f"suffixes, e.g. [{','.join(TRAINABLE)}] (the authors')")


@dataclass
class TuneSamplerConfig(SamplerConfig):
    """DDIM with classifier-free guidance from the inverted source video; the authors guide at 12.5."""

    guidance_scale: float = 12.5


@dataclass
class TuneExperimentConfig:
    """`python experiments/tune_a_video.py`: Tune-A-Video, a model tuned on one video, then that video edited."""

    defaults: list[Any] = field(default_factory=lambda: [
        "_self_", {"tune": "default"}, {"sampler": "tune"}, {"output": "default"}, {"logger": "default"},
        {"metrics": "default"}, {"hydra/job": "t2vz"}, {"override hydra/callbacks": "experiment"},
        {"override hydra/help": "t2vz_tune"}])
    source_video: str = MISSING  # the video to tune on and edit: a video file or a folder of frames
    prompt: Optional[str] = None  # what the source video shows; required unless `tuned` is given
    edit_prompts: list[str] = field(default_factory=list)  # one video each; empty: the prompt itself
    model: str = "toyworld"  # a t2vz model folder (SD 1.5-shaped) or a shipped model
    tuned: Optional[str] = None  # tuned weights of `model` (a tuned.safetensors): edit with them, no tuning
    num_frames: int = 8  # the first N frames of the video
    height: Optional[int] = None  # None: the model's own size (512 for SD 1.5, 64 for toyworld)
    width: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    name: str = "tune_a_video"
    tune: TuneConfig = field(default_factory=TuneConfig)
    sampler: TuneSamplerConfig = field(default_factory=TuneSamplerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resume: bool = True  # a point complete already (same config) is skipped (`resume.Point`); false: run it again
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # metrics.clip: the CLIP of `edit_metrics`

    def __post_init__(self):
        check_int("num_frames", self.num_frames, 1)
        check_resolution("height", self.height)
        check_resolution("width", self.width)
        if self.tuned is None and not (self.prompt or "").strip():
            raise ValueError('no prompt: give prompt="..." (what the source video shows) to tune on it, or '
                             "tuned=FILE to edit with weights tuned before")
        if not all(isinstance(p, str) and p.strip() for p in self.edit_prompts):
            raise ValueError(f"edit_prompts={list(self.edit_prompts)!r} must be non-empty strings")


def source_video(config: TuneExperimentConfig) -> torch.Tensor:
    """The first `num_frames` frames of `config.source_video`, read before any model loads; ValueError if it has
    fewer."""
    frames = load_frames(config.source_video, "source_video", max_frames=config.num_frames)
    if len(frames) < config.num_frames:
        raise ValueError(f"num_frames={config.num_frames} but source_video {config.source_video} has only "
                         f"{len(frames)} frames; pass num_frames <= {len(frames)}")
    return frames


def tune_and_edit(config: TuneExperimentConfig, tracker: Tracker) -> tuple[TuneAVideo, dict, torch.Tensor]:
    """Tune (unless `config.tuned`), then edit: (the pipeline, what run.json records, the videos (P, f, H, W, 3)).
    Nothing is written here."""
    frames = source_video(config)
    pipe = TuneAVideo.from_pretrained(config.model, tuned=config.tuned, device=resolve_device(config.device))
    info: dict[str, Any] = {}
    if config.tuned is None:
        t = config.tune
        start = time.perf_counter()
        losses = pipe.tune(frames, config.prompt, height=config.height, width=config.width, trainable=t.trainable,
                           steps=t.steps, lr=t.lr, gradient_checkpointing=t.gradient_checkpointing,
                           weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                           generator=torch.Generator().manual_seed(config.seed), progress=config.output.progress,
                           on_step=lambda step, loss: tracker.log_metrics({"loss": loss, "step": step}))
        tune_s = time.perf_counter() - start
        info["tune"] = {"losses": losses, "tune_s": round(tune_s, 3), "s_per_step": round(tune_s / t.steps, 4)}
    else:
        info["tuned"] = {k: pipe.sd.config["tuned"][k] for k in ("file", "base_model", "base_unet_sha256",
                                                                   "trainable", "num_frames", "prompt")}
    prompts = list(config.edit_prompts) or [config.prompt or pipe.prompt]
    s = config.sampler
    start = time.perf_counter()
    videos = pipe.edit(frames, prompts, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                       negative_prompt=s.negative_prompt, height=config.height, width=config.width, eta=s.eta,
                       generator=torch.Generator().manual_seed(config.seed), progress=config.output.progress)
    info["edit_s"] = round(time.perf_counter() - start, 3)
    info["prompts"] = prompts
    return pipe, info, videos


def edit_metrics(videos: torch.Tensor, prompts: list[str], config: TuneExperimentConfig) -> dict[str, float]:
    """Tune-A-Video's own two numbers for the edited videos (P, f, H, W, 3), averaged over the P edits:
    `textual_faithfulness` (the CLIP score of each video's frames against its edit prompt) and `frame_consistency`
    (100 · mean cosine of CLIP image embeddings over all pairs of frames), plus `frame_consistency_consecutive`;
    by `metrics.clip` (the toy CLIP by default); {} with metrics.clip=null."""
    if not config.metrics.clip_name:
        return {}
    from .run import cached_scorer

    scorer = cached_scorer(config.metrics.clip_name, config.device)
    per_edit = [{"textual_faithfulness": scorer.textual_faithfulness(video, prompt), **scorer.frame_consistency(video)}
                for video, prompt in zip(videos, prompts)]
    return {key: sum(m[key] for m in per_edit) / len(per_edit) for key in per_edit[0]}


def write_tune_run(folder: Path, pipe: TuneAVideo, info: dict, videos: torch.Tensor, config: TuneExperimentConfig,
                   config_yaml: str, start: float, extra: dict | None = None) -> list[str]:
    """Write the job's files (module docstring), each atomically, with `extra` in run.json (the config hash and
    Slurm job, `resume.Point.run_info`); returns their names."""
    out, names = config.output, []
    if config.tuned is None:
        names.append(pipe.save(folder / TUNED_FILE).name)
    edits = []
    for i, (prompt, video) in enumerate(zip(info["prompts"], videos)):
        paths = write_outputs(folder, video, stem=f"{out.stem}_{i}", fps=out.fps, formats=tuple(out.formats))
        edits.append({"prompt": prompt, "files": [p.name for p in paths.values()]})
        names += edits[-1]["files"]
    write_text(folder / "config.yaml", config_yaml)
    run = {"t2vz": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(resolve_device(config.device)), "seed": config.seed, "frames": list(videos.shape[1:]),
           "wall_s": round(time.perf_counter() - start, 3), "edits": edits,
           **{k: v for k, v in info.items() if k != "prompts"}, "outputs": names, **(extra or {})}
    write_text(folder / "run.json", json.dumps(run, indent=2) + "\n")
    return names + ["config.yaml", "run.json"]


def run_tune_experiment(cfg: DictConfig) -> float:
    """One Hydra job of experiments/tune_a_video.py, logged like `run.run_experiment`: `metrics.json` in every case
    (the final loss, the seconds tuning and editing, or status "failed" and the error). A single job that fails
    prints one line and exits 2; in a sweep it is recorded as failed and the others run. Returns the final loss
    (NaN without tuning or on failure). A point complete already is skipped (`resume.Point`), as in
    `run.run_experiment`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    start = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    run_dir, record, logger = job_start(cfg)
    point = Point(cfg, run_dir)
    skipped = point.skip_or_begin(record, "loss_final")
    if skipped is not None:  # complete already: skipped, its files untouched
        return skipped
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    headline = float("nan")
    with Tracker(logger, run_dir, OmegaConf.to_container(cfg, resolve=True), name=run_dir.name,
                 job_type="tune", run_id=job_run_id()) as tracker:
        try:
            check_model_folders(cfg)
            config = to_config(cfg, ("source_video",))
            pipe, info, videos = tune_and_edit(config, tracker)
            names = write_tune_run(run_dir, pipe, info, videos, config, config_yaml, start, point.run_info())
            metrics = {"edit_s": info["edit_s"], **edit_metrics(videos, info["prompts"], config)}
            if config.metrics.clip_name:
                record["clip_model"] = config.metrics.clip_name
            if "tune" in info:  # tuned here, not loaded
                losses = info["tune"]["losses"]
                metrics.update(loss_final=losses[-1], loss_mean=sum(losses) / len(losses),
                               tune_s=info["tune"]["tune_s"])
            record.update(metrics)
            tracker.log_metrics(metrics)
            for i in range(len(videos)):
                stem = f"{config.output.stem}_{i}"
                if f"{stem}.mp4" in names:
                    tracker.log_video(run_dir / f"{stem}.mp4", key=f"video_{i}")
                tracker.log_image(f"contact_sheet_{i}", run_dir / f"{stem}_sheet.png")
            headline = metrics.get("loss_final", float("nan"))
        except USER_ERRORS as e:
            record.update(status="failed", error=" ".join(str(e).split()) or type(e).__name__)
            tracker.fail(record["error"])
            single = hydra_cfg.mode == RunMode.RUN
            print(f"t2vz: error: {'' if single else f'job {run_dir.name} failed: '}{record['error']}",
                  file=sys.stderr)
    write_text(run_dir / "metrics.json", json.dumps(record, indent=2) + "\n")
    point.end(record["status"])
    if record["status"] == "ok":
        print(f"t2vz: job {run_dir.name} ok, loss_final={headline:.4g}; results in {run_dir}" if "loss_final" in record
              else f"t2vz: job {run_dir.name} ok; results in {run_dir}")
    elif hydra_cfg.mode == RunMode.RUN:
        sys.exit(2)
    return headline


# ------------------------------------------------------------------------------------------------------ --help
TUNE_OPTIONS = {
    "source_video": "required: the video to tune on and edit (a video file or a folder of frames)",
    "prompt": "what the source video shows (required unless tuned=FILE)",
    "edit_prompts": "one edited video each, e.g. '[\"a panda is walking\"]'; []: the prompt itself",
    "model": "toyworld (ships with t2vz) or a t2vz model folder (SD 1.5-shaped)",
    "tuned": "tuned weights of the model (a tuned.safetensors): skip tuning, edit with them",
    "num_frames": "the first N frames of the video",
    "height": "pixels, a multiple of 8 (also width); null: the model's own size",
    "tune.steps": "tuning steps",
    "tune.lr": "AdamW learning rate (constant)",
    "tune.trainable": "module name suffixes that learn",
    "tune.gradient_checkpointing": "recompute activations in the backward pass (less memory)",
    "sampler.num_inference_steps": "DDIM steps, for the inversion and for each edit",
    "sampler.guidance_scale": "classifier-free guidance weight",
    "seed": "seeds every random draw",
    "logger.mode": "W&B: online | offline | disabled (or logger=offline, logger=disabled)",
}


def help_template() -> str:
    return f"""\
Tune-A-Video (Wu et al., ICCV 2023): tune a text-to-image model on one video and its prompt (temporal attention
added, the attention queries and the temporal layers trained), then edit that video by other prompts from its
DDIM-inverted latents.

Usage: python experiments/tune_a_video.py source_video=FILE prompt=TEXT 'edit_prompts=[TEXT,...]' [key=value ...]

Key options, with their defaults (every key of the config below can be set with key=value):
{option_lines(TuneExperimentConfig, TUNE_OPTIONS, {})}

Example:
  python experiments/tune_a_video.py source_video=square.gif prompt="a red square on grass" tune.steps=100 \\
      'edit_prompts=["a blue square on grass","a red square on snow"]'

Each job writes into its Hydra folder (outputs/DATE/TIME/): tuned.safetensors (the tuned tensors, loadable with
tuned=FILE or t2vz.load(model, tuned=FILE)), video_0.mp4, video_0.gif, video_0_sheet.png, ... (one per edit prompt),
config.yaml, run.json, metrics.json; the loss of every step goes to W&B (logger.mode=offline|online|disabled).
Bad input ends with one line and exit code 2.

{HYDRA_HELP_TAIL}"""


def register() -> ConfigStore:
    cs = ConfigStore.instance()
    cs.store(name="tune_experiment", node=TuneExperimentConfig)
    cs.store(group="tune", name="default", node=TuneConfig)
    cs.store(group="sampler", name="tune", node=TuneSamplerConfig)
    cs.store(group="hydra/help", name="t2vz_tune", node={
        "app_name": "t2vz_tune", "header": "", "template": help_template(),
        "footer": "Powered by Hydra (https://hydra.cc); --hydra-help shows Hydra's own options.\n"})
    return cs


register()
