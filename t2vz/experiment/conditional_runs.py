"""Experiment jobs of the conditional pipelines, logged like the text-to-video runs (`run.run_experiment`):

    python experiments/control_video.py prompt="an astronaut dancing" model=MODEL controlnet=CONTROLNET \
        control.video=dance.mp4 control.detector=canny
    python experiments/instruct_video.py instruction="make it winter" model=IP2P_MODEL source.video=walk.mp4

One dataclass per config node, registered with Hydra's ConfigStore (`control_experiment`, `instruct_experiment`);
field names are the pipelines' argument names where one exists. `__post_init__` checks values before any model loads.
Sweeps live in conf/experiment/control/ and conf/experiment/instruct/ (`+experiment=control/NAME -m`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..sd.attention import CROSS_FRAME_MODES
from ..sd.loading import DTYPES
from ..sd.lora import parse_lora_entries
from ..video_io import load_frames
from .config import (
    HYDRA_HELP_TAIL, FastConfig, LoggerConfig, MetricsConfig, OutputConfig, SamplerConfig, check_choice, check_int,
    option_lines,
)
from .run import Task, compiled, measure, resolve_device

DETECTORS = ("none", "canny")
CHOICES = {"cross_frame": CROSS_FRAME_MODES, "control.detector": DETECTORS}  # the enum-like keys' allowed values


def check_common(config: JobConfig) -> None:
    """The values of the keys every conditional job has: dtype, lora, cross_frame, chunk_size."""
    check_choice("dtype", config.dtype)
    parse_lora_entries(config.lora)
    check_choice("cross_frame", config.cross_frame, CHOICES)
    if config.chunk_size is not None:
        check_int("chunk_size", config.chunk_size, 2)


def check_resolution(key: str, value: Optional[int], multiple: int = 8) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < multiple
                              or value % multiple):
        raise ValueError(f"{key}={value!r} must be a multiple of {multiple} (>= {multiple}), e.g. 512, or null")


def to_config(cfg: DictConfig, required: tuple[str, ...]):
    """The composed config → its dataclass, running every `__post_init__` check; a missing required key is a
    ValueError that says how to give it."""
    def is_missing(key: str) -> bool:
        parent, _, leaf = key.rpartition(".")
        return OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, leaf)

    missing = [key for key in required if is_missing(key)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}; give {' '.join(k + '=...' for k in missing)} on the "
                         "command line (--help lists the options)")
    return OmegaConf.to_object(cfg)


@dataclass
class JobConfig:
    """The keys every conditional job shares; `seed` seeds every random draw, `device` auto is cuda if available."""

    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    lora: list[str] = field(default_factory=list)  # LoRA files merged into the model: FILE or FILE:SCALE entries
    compile: bool = False
    cross_frame: str = "first"
    chunk_size: Optional[int] = None
    fast: FastConfig = field(default_factory=FastConfig)  # token merging and feature caching (config.FastConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resume: bool = True  # a point complete already (same config) is skipped (`resume.Point`); false: run it again
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self):
        check_common(self)


# ------------------------------------------------------------------------------------------------ ControlVideo
@dataclass
class ControlConfig:
    """The control video: one control map per frame, as the ControlNet takes them (edges, pose, depth)."""

    video: str = MISSING  # a video file or a folder of frames
    detector: str = "none"  # none: the frames are control maps already; canny: t2vz's Canny edges of the frames
    low_threshold: float = 100.0  # Canny thresholds on the 0..255 intensity scale (the ControlNet annotators')
    high_threshold: float = 200.0
    num_frames: Optional[int] = None  # the first N frames of the video; None: all of them
    resolution: Optional[int] = None  # resize so the long side is this (sides multiples of 8); None: as given
    conditioning_scale: float = 1.0  # multiplies the ControlNet's residuals

    def __post_init__(self):
        check_choice("control.detector", self.detector, CHOICES)
        low, high = self.low_threshold, self.high_threshold
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
            raise ValueError(f"control.low_threshold={low!r} and control.high_threshold={high!r} must be finite "
                             "with 0 <= low <= high (e.g. 100 and 200)")
        if self.num_frames is not None:
            check_int("control.num_frames", self.num_frames, 1)
        check_resolution("control.resolution", self.resolution)
        if not math.isfinite(self.conditioning_scale):
            raise ValueError(f"control.conditioning_scale={self.conditioning_scale!r} must be a finite number")


@dataclass
class ControlExperimentConfig(JobConfig):
    """`python experiments/control_video.py`: a video that follows a control video (T2V-Zero Sec. 3.4)."""

    defaults: list[Any] = field(default_factory=lambda: [
        "_self_", {"control": "default"}, {"sampler": "default"}, {"fast": "default"}, {"output": "default"},
        {"logger": "default"}, {"metrics": "default"}, {"hydra/job": "t2vz"},
        {"override hydra/callbacks": "experiment"}, {"override hydra/help": "t2vz_control"}])
    prompt: str = MISSING
    model: str = MISSING  # a t2vz model folder: SD 1.5 or any SD 1.5-shaped fine-tune (DreamBooth)
    controlnet: str = MISSING  # a t2vz ControlNet folder (`python -m weights_convert CONTROLNET_FILE OUT`)
    name: str = "control_video"
    control: ControlConfig = field(default_factory=ControlConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


def control_maps(control: ControlConfig) -> torch.Tensor:
    """The control maps (f, h, w, 3) in [0, 1] a `ControlConfig` describes: read, cut, and Canny edges if asked."""
    frames = load_frames(control.video, "control.video", max_frames=control.num_frames)
    if control.num_frames is not None and len(frames) < control.num_frames:
        raise ValueError(f"control.num_frames={control.num_frames} but {control.video} has {len(frames)} frames")
    if control.detector == "canny":
        from ..method.canny import canny_edges

        frames = canny_edges(frames, control.low_threshold, control.high_threshold)
    return frames


@functools.lru_cache(maxsize=1)
def cached_control_video(model: str, controlnet: str, device: str, dtype: str, compile_unet: bool,
                         lora: tuple[str, ...] = ()):
    from ..method.controlvideo import ControlVideo

    return compiled(ControlVideo.from_pretrained(model, controlnet, device=resolve_device(device),
                                                 dtype=DTYPES[dtype], lora=parse_lora_entries(lora)), compile_unet)


def generate_control_video(config: ControlExperimentConfig):
    pipe = cached_control_video(config.model, config.controlnet, config.device, config.dtype, config.compile,
                                tuple(config.lora))
    s = config.sampler
    frames = pipe(config.prompt, control=control_maps(config.control), resolution=config.control.resolution,
                  controlnet_conditioning_scale=config.control.conditioning_scale, cross_frame=config.cross_frame,
                  chunk_size=config.chunk_size, **vars(config.fast), num_inference_steps=s.num_inference_steps,
                  guidance_scale=s.guidance_scale, eta=s.eta, negative_prompt=s.negative_prompt,
                  generator=torch.Generator().manual_seed(config.seed), progress=config.output.progress)
    return frames, pipe.sd


CONTROL_VIDEO = Task(
    to_config=lambda cfg: to_config(cfg, ("prompt", "model", "controlnet", "control.video")),
    generate=generate_control_video,
    measure=lambda frames, config, sd: measure(frames, config, config.metrics.clip_name),
    load=lambda c: cached_control_video(c.model, c.controlnet, c.device, c.dtype, c.compile, tuple(c.lora)),
)


# --------------------------------------------------------------------------------------- Video Instruct-Pix2Pix
@dataclass
class SourceConfig:
    """The video to edit; frames are resized so the long side is `resolution`, each side a multiple of
    `size_multiple` (the authors' code: 512 and 64)."""

    video: str = MISSING  # a video file or a folder of frames
    num_frames: Optional[int] = None  # the first N frames; None: all of them
    resolution: Optional[int] = 512  # None: keep the size if both sides are multiples of 8
    size_multiple: int = 64

    def __post_init__(self):
        if self.num_frames is not None:
            check_int("source.num_frames", self.num_frames, 1)
        if self.size_multiple not in (8, 16, 32, 64):
            raise ValueError(f"source.size_multiple={self.size_multiple!r} must be 8, 16, 32 or 64")
        check_resolution("source.resolution", self.resolution)


@dataclass
class InstructSamplerConfig(SamplerConfig):
    """DDIM with InstructPix2Pix's two guidance weights: text (guidance_scale) and source image."""

    image_guidance_scale: float = 1.5

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.image_guidance_scale) and self.image_guidance_scale >= 0):
            raise ValueError(f"sampler.image_guidance_scale={self.image_guidance_scale!r} must be a finite number "
                             ">= 0")


@dataclass
class InstructExperimentConfig(JobConfig):
    """`python experiments/instruct_video.py`: Video Instruct-Pix2Pix, a video edited by an instruction (Sec. 3.5)."""

    defaults: list[Any] = field(default_factory=lambda: [
        "_self_", {"source": "default"}, {"sampler": "instruct"}, {"fast": "default"}, {"output": "default"},
        {"logger": "default"}, {"metrics": "default"}, {"hydra/job": "t2vz"},
        {"override hydra/callbacks": "experiment"}, {"override hydra/help": "t2vz_instruct"}])
    instruction: str = MISSING
    model: str = MISSING  # a t2vz InstructPix2Pix model folder (8-channel UNet)
    name: str = "instruct_video"
    source: SourceConfig = field(default_factory=SourceConfig)
    sampler: InstructSamplerConfig = field(default_factory=InstructSamplerConfig)


@functools.lru_cache(maxsize=1)
def cached_instruct_video(model: str, device: str, dtype: str, compile_unet: bool, lora: tuple[str, ...] = ()):
    from ..method.instruct import VideoInstructPix2Pix

    return compiled(VideoInstructPix2Pix.from_pretrained(model, device=resolve_device(device), dtype=DTYPES[dtype],
                                                         lora=parse_lora_entries(lora)), compile_unet)


def generate_instruct_video(config: InstructExperimentConfig):
    pipe = cached_instruct_video(config.model, config.device, config.dtype, config.compile, tuple(config.lora))
    s, src = config.sampler, config.source
    frames = pipe(config.instruction, video=src.video, num_frames=src.num_frames, resolution=src.resolution,
                  size_multiple=src.size_multiple, guidance_scale=s.guidance_scale,
                  image_guidance_scale=s.image_guidance_scale, num_inference_steps=s.num_inference_steps,
                  negative_prompt=s.negative_prompt, eta=s.eta, cross_frame=config.cross_frame,
                  chunk_size=config.chunk_size, **vars(config.fast),
                  generator=torch.Generator().manual_seed(config.seed),
                  progress=config.output.progress)
    return frames, pipe.sd


INSTRUCT_VIDEO = Task(
    to_config=lambda cfg: to_config(cfg, ("instruction", "model", "source.video")),
    generate=generate_instruct_video,
    measure=lambda frames, config, sd: measure(frames, config, config.metrics.clip_name, text=config.instruction),
    load=lambda c: cached_instruct_video(c.model, c.device, c.dtype, c.compile, tuple(c.lora)),
)


# ------------------------------------------------------------------------------------------------------ --help
CONTROL_OPTIONS = {
    "prompt": "required: the video's text",
    "model": "required: a t2vz model folder (SD 1.5, or a DreamBooth fine-tune of it)",
    "controlnet": "required: a t2vz ControlNet folder (python -m weights_convert CONTROLNET_FILE OUT)",
    "lora": "LoRA files merged into the model (not the ControlNet): [FILE:SCALE,...], SCALE 1.0 if left out",
    "control.video": "required: the control video (a video file or a folder of frames)",
    "control.detector": "none: the frames are control maps (pose, depth); canny: edges of the frames",
    "control.num_frames": "the first N frames of the control video (null: all)",
    "control.resolution": "resize the control: long side in pixels (null: as given)",
    "control.conditioning_scale": "strength of the ControlNet",
    "cross_frame": "what self-attention of every frame looks at",
    "chunk_size": "frames per denoising chunk for long videos (null: all at once)",
    "sampler.num_inference_steps": "DDIM steps",
    "seed": "seeds every random draw",
}
INSTRUCT_OPTIONS = {
    "instruction": "required: the edit, e.g. 'make it winter'",
    "model": "required: a t2vz InstructPix2Pix model folder (python -m weights_convert IP2P_CKPT OUT)",
    "lora": "LoRA files merged into the model: [FILE:SCALE,...], SCALE 1.0 if left out",
    "source.video": "required: the video to edit (a video file or a folder of frames)",
    "source.num_frames": "the first N frames (null: all)",
    "source.resolution": "long side in pixels after resizing (null: keep a size that is a multiple of 8)",
    "source.size_multiple": "each side is rounded to a multiple of this",
    "sampler.guidance_scale": "text guidance weight",
    "sampler.image_guidance_scale": "source-image guidance weight",
    "cross_frame": "what self-attention of every frame looks at",
    "chunk_size": "frames per denoising chunk for long videos (null: all at once)",
    "seed": "seeds every random draw",
}


def help_text(script: str, what: str, node, options: dict[str, str], example: str) -> str:
    return f"""\
{what}

Usage: python experiments/{script} KEY=VALUE ...        (-m: a sweep, one job per value; +experiment=NAME -m)

Key options, with their defaults (every key of the config below can be set with key=value):
{option_lines(node, options, CHOICES)}

Example:
  {example}

Each job writes into its Hydra folder (outputs/DATE/TIME/, multirun/DATE/TIME/N/ with -m): video.mp4, video.gif,
video_sheet.png, frames.npz, config.yaml, run.json, metrics.json; and logs them to W&B (logger.mode=offline|online|
disabled). Bad input fails the job with one line; a sweep goes on.

{HYDRA_HELP_TAIL}"""


def register() -> ConfigStore:
    cs = ConfigStore.instance()
    cs.store(name="control_experiment", node=ControlExperimentConfig)
    cs.store(group="control", name="default", node=ControlConfig)
    cs.store(name="instruct_experiment", node=InstructExperimentConfig)
    cs.store(group="source", name="default", node=SourceConfig)
    cs.store(group="sampler", name="instruct", node=InstructSamplerConfig)
    footer = "Powered by Hydra (https://hydra.cc); --hydra-help shows Hydra's own options.\n"
    helps = {
        "t2vz_control": help_text(
            "control_video.py", "ControlVideo: Text2Video-Zero with a ControlNet (Sec. 3.4): a video that follows "
            "a control video\n(edges, pose, depth), one control map per frame, cross-frame attention.",
            ControlExperimentConfig, CONTROL_OPTIONS,
            "python experiments/control_video.py prompt=\"an astronaut dancing\" model=models/sd15 "
            "controlnet=models/cn-canny control.video=dance.mp4 control.detector=canny"),
        "t2vz_instruct": help_text(
            "instruct_video.py", "Video Instruct-Pix2Pix (Text2Video-Zero Sec. 3.5): a video edited by a text "
            "instruction,\nframe by frame with cross-frame attention.", InstructExperimentConfig, INSTRUCT_OPTIONS,
            "python experiments/instruct_video.py instruction=\"make it winter\" model=models/ip2p "
            "source.video=walk.mp4"),
    }
    for name, template in helps.items():
        cs.store(group="hydra/help", name=name,
                 node={"app_name": name, "header": "", "footer": footer, "template": template})
    return cs


register()
