"""The configuration of `python -m t2vz`: one dataclass per buildable thing, registered with Hydra's ConfigStore.

Field names equal the arguments they feed: every field of `video`, `sampler`, `method` and `fast` (and
`output.progress`) is an argument of `TextToVideoZero.__call__` of the same name; `model`, `device`, `dtype` feed
`TextToVideoZero.from_pretrained`, and so does `lora` (LoRA files merged into the model, `FILE:SCALE` entries,
`sd.lora`); `seed` seeds the `torch.Generator`; `output` feeds `video_io.write_outputs`; `image` (a picture file:
image-to-video, frame 1 is the picture) is `__call__`'s `image=`.

    prompt  image=null  model=toyworld  lora=[]  seed=0  device=auto  dtype=fp32
    video:   num_frames=8  height=null  width=null  chunk_size=null  num_videos_per_prompt=1
    sampler: num_inference_steps=50  guidance_scale=7.5  eta=0.0  negative_prompt=null
    method:  motion_strength=null  direction=[1.0, 1.0]  t0=null  t1=null  ddpm_marginal=exact  cross_frame=first
             cross_frame_levels=null  motion_dynamics=true  smooth_bg=false  alpha=0.6  smoothing=paper
             mask_tokens=null  inversion_guidance_scale=1.0
    fast:    merging_ratio=0.0  merging_max_downsample=1  merging_options={}  cache_interval=1  cache_branch=0
    output:  fps=4.0  formats=[mp4, gif]  stem=video  progress=true

`video`, `sampler`, `method`, `fast` and `output` are config groups with one option each, `default`; YAML files in
`conf/` add options and experiments. Hydra checks key names and types at composition (`method.lamda=3` and
`video.num_frames=abc` fail there); `__post_init__` checks values (`dtype=fp64`, `video.height=36`, t0 > t1) and
runs when `to_generate_config` turns the composed config into these dataclasses, before any model is loaded; it
also reads `image` (`check_image`: a missing file or one that is not an image is named there).
`method.motion_strength`, `method.t0` and `method.t1` left null are the model's own, filled in from its folder's
`t2vz_model.json` (`fill_method_defaults`; the paper's 12, 44, 47 unless the folder sets others), so the saved
config and the W&B run show the values the video was made with.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..method.smoothing import SMOOTHING_FORMS
from ..method.text2video_zero import DDPM_MARGINALS, t0_t1_for_steps
from ..sd.attention import CROSS_FRAME_MODES, check_cross_frame_levels
from ..sd.loading import DTYPES
from ..sd.lora import parse_lora_entries
from ..sd.model_folder import PAPER_METHOD, model_method_defaults
from ..video_io import VIDEO_FORMATS, load_image
from .tracking import LoggerConfig

# the enum-like options and their allowed values, from the modules that define them
CHOICES = {"dtype": tuple(DTYPES), "method.ddpm_marginal": DDPM_MARGINALS, "method.cross_frame": CROSS_FRAME_MODES,
           "method.smoothing": SMOOTHING_FORMS, "output.formats": VIDEO_FORMATS,
           "fast.merging_max_downsample": (1, 2, 4, 8)}
SIZE_MULTIPLE = 8  # SD 1.5's VAE downsamples by 8; the pipeline re-checks against the loaded model's factor


def check_choice(key: str, value: Any, choices: dict[str, tuple] = CHOICES) -> None:
    """ValueError naming `key`, `value` and the allowed values unless `value` is one of `choices[key]`."""
    if value not in choices[key]:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(choices[key])}")


def check_int(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r} must be an integer >= {low}")


def check_image(key: str, value: Optional[str]) -> None:
    """A picture file that pillow reads, or None: `video_io.load_image`'s VideoIOError (a ValueError) naming `key`
    and the file otherwise ("cannot read image x.png: no such file" / ": not an image (...)")."""
    if value is not None:
        load_image(value, key)


@dataclass
class VideoConfig:
    """What to generate: frames per video, frame size, videos per prompt, frames per denoising chunk."""

    num_frames: int = 8
    height: Optional[int] = None  # None: the model's own size (512 for SD 1.5, 64 for toyworld)
    width: Optional[int] = None
    chunk_size: Optional[int] = None  # None: all frames at once; else at most this many (≥ 2) per chunk
    num_videos_per_prompt: int = 1

    def __post_init__(self):
        check_int("video.num_frames", self.num_frames, 1)
        for key, value in (("video.height", self.height), ("video.width", self.width)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
                raise ValueError(f"{key}={value!r} must be a positive multiple of {SIZE_MULTIPLE} "
                                 f"(SD 1.5's VAE downsamples by {SIZE_MULTIPLE}), e.g. 512")
        if self.chunk_size is not None:
            check_int("video.chunk_size", self.chunk_size, 2)
        check_int("video.num_videos_per_prompt", self.num_videos_per_prompt, 1)


@dataclass
class SamplerConfig:
    """DDIM with classifier-free guidance."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    negative_prompt: Optional[str] = None

    def __post_init__(self):
        check_int("sampler.num_inference_steps", self.num_inference_steps, 2)
        for key, value in (("sampler.guidance_scale", self.guidance_scale), ("sampler.eta", self.eta)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key}={value!r} must be a finite number >= 0")


@dataclass
class MethodConfig:
    """Text2Video-Zero: motion dynamics in the latents (λ, δ, t0 ≤ t1) and cross-frame attention (Sec. 3.2–3.3);
    optional background smoothing with weight α inside the mask from the `mask_tokens` words (None: all words).
    λ, t0, t1 None: the model's own (`model_folder.method_defaults`: the paper's 12, 44, 47, or its folder's own)."""

    motion_strength: Optional[float] = None
    direction: list[float] = field(default_factory=lambda: [1.0, 1.0])
    t0: Optional[int] = None
    t1: Optional[int] = None
    delta_t: Optional[int] = None  # Δt = t1 − t0 DDIM steps: with t0 null, t0 = t1 − Δt (sweeps Δt at any t1)
    ddpm_marginal: str = "exact"
    motion_dynamics: bool = True  # False: the paper's ablation, an independent x_T per frame
    cross_frame: str = "first"
    cross_frame_levels: Optional[list[int]] = None  # an ablation: UNet levels with cross-frame attention; None: all
    smooth_bg: bool = False
    alpha: float = 0.6
    smoothing: str = "paper"
    mask_tokens: Optional[str] = None
    inversion_guidance_scale: float = 1.0  # image-to-video (`image=`): the guidance the picture is inverted with

    def __post_init__(self):
        # the options with a fixed set of values first: a typo is named before any number (perhaps the model's
        # own, filled in) is checked
        check_choice("method.ddpm_marginal", self.ddpm_marginal)
        check_choice("method.cross_frame", self.cross_frame)
        check_choice("method.smoothing", self.smoothing)
        if self.motion_strength is not None and not math.isfinite(self.motion_strength):
            raise ValueError(f"method.motion_strength={self.motion_strength!r} must be a finite number")
        if len(self.direction) != 2 or not all(math.isfinite(d) for d in self.direction):
            raise ValueError(f"method.direction={list(self.direction)!r} must be two finite numbers [dx, dy]")
        if self.delta_t is not None and self.t0 is not None and self.t1 is not None and self.t0 < 0:
            raise ValueError(f"method.delta_t={self.delta_t} exceeds method.t1={self.t1}: t0 = t1 - delta_t must be "
                             ">= 0; lower method.delta_t or raise method.t1 (or the steps)")
        if self.t0 is not None:
            check_int("method.t0", self.t0, 0)
        if self.t1 is not None:
            check_int("method.t1", self.t1, 1)
        if self.delta_t is not None:
            check_int("method.delta_t", self.delta_t, 0)
            if self.t0 is not None and self.t1 is not None and self.t1 - self.t0 != self.delta_t:
                raise ValueError(f"method.t0={self.t0} and method.delta_t={self.delta_t} disagree with "
                                 f"method.t1={self.t1} (t0 = t1 - delta_t); give method.t0 or method.delta_t")
        if self.t0 is not None and self.t1 is not None and self.t0 > self.t1:
            raise ValueError(f"method.t0={self.t0} must not exceed method.t1={self.t1} "
                             f"(t1 - t0 DDIM steps of motion; the paper uses t0=44 t1=47)")
        check_cross_frame_levels(self.cross_frame_levels, self.cross_frame, prefix="method.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"method.alpha={self.alpha!r} must lie in [0, 1]")
        g = self.inversion_guidance_scale
        if not math.isfinite(g) or g < 0:
            raise ValueError(f"method.inversion_guidance_scale={g!r} must be a finite number >= 0 (1: no guidance, "
                             "the usual choice for DDIM inversion)")


@dataclass
class FastConfig:
    """The fast modes, approximations that trade exactness for speed; their defaults are the exact path.
    Token merging (ToMe for SD, Bolya & Hoffman 2023): `merging_ratio` of the tokens merged before self-attention
    at the levels down to `merging_max_downsample` (1: the full latent resolution only); `merging_options`, the
    rest of `t2vz.sd.tome.TokenMerging` (sx, sy, use_rand, merge_crossattn, merge_mlp). Feature caching (DeepCache,
    Ma et al. 2024): a full UNet pass every `cache_interval` steps, in between only the shallow branch
    `cache_branch` (0: the shallowest) on the cached deep features. docs/method.md has both."""

    merging_ratio: float = 0.0
    merging_max_downsample: int = 1
    merging_options: dict[str, Any] = field(default_factory=dict)
    cache_interval: int = 1
    cache_branch: int = 0

    def __post_init__(self):
        if isinstance(self.merging_ratio, bool) or not 0.0 <= self.merging_ratio < 1.0:
            raise ValueError(f"fast.merging_ratio={self.merging_ratio!r} must lie in [0, 1) (0: no merging; tomesd's "
                             "recommended 0.5 merges half the tokens)")
        check_choice("fast.merging_max_downsample", self.merging_max_downsample)
        check_int("fast.cache_interval", self.cache_interval, 1)
        check_int("fast.cache_branch", self.cache_branch, 0)


@dataclass
class OutputConfig:
    """What `video_io.write_outputs` writes into the run folder: `{stem}.{format}` and `{stem}_sheet.png`."""

    fps: float = 4.0
    formats: list[str] = field(default_factory=lambda: ["mp4", "gif"])
    stem: str = "video"
    progress: bool = True  # tqdm bars while denoising

    def __post_init__(self):
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"output.fps={self.fps!r} must be a positive number")
        for fmt in self.formats:
            check_choice("output.formats", fmt)
        if not self.stem or any(c in self.stem for c in "/\\") or self.stem in (".", ".."):
            raise ValueError(f"output.stem={self.stem!r} must be a plain file name stem such as 'video'")


GROUPS = {"video": VideoConfig, "sampler": SamplerConfig, "method": MethodConfig, "fast": FastConfig,
          "output": OutputConfig}


@dataclass
class GenerateConfig:
    """`python -m t2vz`: one prompt → one video (or `video.num_videos_per_prompt` videos) in Hydra's run folder."""

    defaults: list[Any] = field(default_factory=lambda: [
        "_self_", *({group: "default"} for group in GROUPS), {"hydra/job": "t2vz"},
        {"override hydra/callbacks": "t2vz"}, {"override hydra/help": "t2vz"}])
    prompt: str = MISSING
    image: Optional[str] = None  # image-to-video: frame 1 is this picture (a file pillow reads), DDIM-inverted to T₁
    model: str = "toyworld"  # a t2vz model folder (`python -m weights_convert` writes them) or a shipped model
    lora: list[str] = field(default_factory=list)  # LoRA files merged into the model: FILE or FILE:SCALE entries
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "fp32"
    compile: bool = False  # torch.compile the UNet: the first video pays the compilation, later ones run faster
    trace: bool = False  # also write trace.png and trace/: the generation's intermediate states (method/trace.py)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        check_choice("dtype", self.dtype)
        parse_lora_entries(self.lora)
        check_image("image", self.image)
        if self.image is not None and not self.method.motion_dynamics:
            raise ValueError(f"image={self.image} cannot be used with method.motion_dynamics=false: the picture is "
                             "frame 1, and reaches the other frames only through the motion dynamics; drop one of "
                             "them")
        if self.method.t1 is not None and self.method.t1 > self.sampler.num_inference_steps - 1:
            raise ValueError(
                f"method.t1={self.method.t1} needs more than sampler.num_inference_steps="
                f"{self.sampler.num_inference_steps} DDIM steps: t0 < t1 count steps from the end, so t1 must be "
                f"at most {self.sampler.num_inference_steps - 1}; lower method.t0/method.t1, raise the steps, or leave "
                "method.t0/method.t1 unset (null) to use the model's own, moved to this step count")


TOY_CLIP = "toyworld"  # metrics.clip's default: the toy CLIP that ships with t2vz (t2vz/data/clip/toyworld)


@dataclass
class MetricsConfig:
    """What `metrics.video_metrics` measures for every job, and which value the job returns to a sweeper.

    `clip` names the CLIP model of the CLIP score and frame consistency: `toyworld` (the default) is the toy CLIP
    that ships with t2vz, trained on the toy world's captioned renders, so that every sweep has a text-alignment
    number offline; its scores rank toy-world videos but are not comparable with published CLIP scores. For those,
    name a transformers CLIPModel folder (e.g. a saved openai/clip-vit-large-patch14, what torchmetrics' CLIPScore
    uses by default); null: no CLIP metrics. The name is recorded in every metrics.json and report."""

    clip: Optional[str] = TOY_CLIP
    clip_model: Optional[str] = None  # the former name of `clip`, kept working: when set, it is used instead
    headline: str = "warp_error"  # the metric the job returns (lower is better for warp_error)

    def __post_init__(self):
        if isinstance(self.clip, str) and self.clip.lower() in ("none", "null", "off", ""):
            self.clip = None

    @property
    def clip_name(self) -> Optional[str]:
        """The CLIP model the job scores with: `clip_model` where given, else `clip` (None: no CLIP metrics)."""
        return self.clip_model or self.clip


EXPERIMENT_GROUPS = {**GROUPS, "logger": LoggerConfig, "metrics": MetricsConfig}


@dataclass
class ExperimentConfig(GenerateConfig):
    """`python experiments/run.py`: a generation plus its metrics, logged to W&B; `+experiment=NAME` picks an
    ablation in conf/experiment/ (each declares its own sweep: add -m)."""

    defaults: list[Any] = field(default_factory=lambda: [
        "_self_", *({group: "default"} for group in EXPERIMENT_GROUPS), {"hydra/job": "t2vz"},
        {"override hydra/callbacks": "experiment"}, {"override hydra/help": "t2vz"}])
    name: str = "t2vz"  # the experiment's name: W&B group prefix and the sweep folder's name
    # A prompt file (one prompt a line; blank lines and lines starting with # skipped) that a sweep's `prompt`
    # takes its values from: `hydra.sweeper.params.prompt: ${t2vz_prompts:${prompts}}` (`read_prompts`)
    prompts: Optional[str] = None
    # a point whose folder holds complete outputs of the same config is skipped (`resume.Point`); false: run it again
    resume: bool = True
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def prompt_file(path: str) -> Path:
    """A prompt file's path: as given when it exists (relative to the working folder), else relative to the
    repository, so that `prompts=experiments/prompts/toyworld.txt` works from any folder of a clone."""
    given = Path(path)
    if given.is_file():
        return given
    in_repo = Path(__file__).resolve().parents[2] / path
    if not given.is_absolute() and in_repo.is_file():
        return in_repo
    raise ValueError(f"prompts={path}: no such file; give a text file with one prompt a line")


def read_prompts(path: str | None) -> str:
    """The prompts of a prompt file (`prompt_file`) as the values of one sweep override: `"p1","p2",…` (each
    `quote_override`d). Blank lines and lines starting with # are skipped."""
    if path is None:
        raise ValueError("this sweep takes its prompts from a file: set prompts=FILE (one prompt a line)")
    lines = [line.strip() for line in prompt_file(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts={path} holds no prompt; write one prompt a line")
    return ",".join(quote_override(p) for p in prompts)


def quote_override(text: str) -> str:
    """`text` as a double-quoted value of Hydra's override grammar: a double quote is escaped, and so are the
    backslashes right before one or at the end (Hydra reads every other backslash as itself)."""
    escaped = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', text)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f'"{escaped}"'


def _sweep_prompts(path: str | None) -> str:
    """`read_prompts` as the resolver `${t2vz_prompts:FILE}` that a sweep's params use: Hydra resolves it while it
    builds the sweep, where a raised error would print a traceback, so a bad file ends the command with one line
    and exit status 2 instead."""
    try:
        return read_prompts(path)
    except (ValueError, OSError) as e:
        print(f"t2vz: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


OmegaConf.register_new_resolver("t2vz_prompts", _sweep_prompts, replace=True)

NOT_PAPER_EDITING = "not_paper_editing"  # conf/experiment/paper_editing.yaml's `pairs` where the config has none


def _sweep_pairs(pairs: str | None) -> str:
    """The resolver `${t2vz_pair_range:...}` of conf/experiment/paper_editing.yaml: every pair index of the pairs
    (`editing_runs.pair_range`). Under another entry point, whose config has no `pairs`, one line names the script
    that runs that sweep, and exit status 2."""
    if pairs == NOT_PAPER_EDITING:
        print("t2vz: error: +experiment=paper_editing is the sweep of experiments/paper_editing.py; run "
              "python experiments/paper_editing.py -m +experiment=paper_editing", file=sys.stderr)
        raise SystemExit(2)
    from .editing_runs import pair_range

    return pair_range(pairs)


OmegaConf.register_new_resolver("t2vz_pair_range", _sweep_pairs, replace=True)


def fill_method_defaults(cfg: DictConfig) -> DictConfig:
    """Replace null `method.motion_strength`, `method.t0`, `method.t1` of a composed config, in place, by its model's
    own (`model_folder.model_method_defaults`: read from the folder's t2vz_model.json, no weights loaded), t0 and
    t1 moved to `sampler.num_inference_steps` (`text2video_zero.t0_t1_for_steps`); with `method.delta_t`, a null
    t0 is t1 − Δt."""
    if OmegaConf.is_missing(cfg, "model") or "method" not in cfg:
        return cfg
    keys = [k for k in ("motion_strength", "t0", "t1") if k in cfg.method and cfg.method[k] is None]
    if keys:
        own = model_method_defaults(cfg.model)
        steps = OmegaConf.select(cfg, "sampler.num_inference_steps", default=None)
        own["t0"], own["t1"] = t0_t1_for_steps(own["t0"], own["t1"], steps)
        if cfg.method.get("delta_t") is not None and "t0" in keys:  # t0 = t1 − Δt, t1 given or the model's own
            keys.remove("t0")
            t1 = own["t1"] if "t1" in keys else cfg.method.t1
            if isinstance(t1, int) and isinstance(cfg.method.delta_t, int):
                cfg.method.t0 = t1 - cfg.method.delta_t
        for key in keys:
            cfg.method[key] = own[key]
    return cfg


def to_generate_config(cfg: DictConfig) -> GenerateConfig:
    """The composed config → GenerateConfig, with the model's own λ, t0, t1 where they are null
    (`fill_method_defaults`), running every `__post_init__` check (ValueError on a bad value). A missing `prompt`
    is a ValueError that says how to give it."""
    if OmegaConf.is_missing(cfg, "prompt"):
        raise ValueError('no prompt given; add prompt="a red circle on grass" to the command line')
    return OmegaConf.to_object(fill_method_defaults(cfg))


MODEL_OWN_KEYS = ("method.motion_strength", "method.t0")  # their texts quote each model's own values
# key → what it does: `--help` lists these with their defaults and, from CHOICES, their allowed values
KEY_OPTIONS = {
    "prompt": "required: the video's text",
    "image": "image-to-video: frame 1 is this picture file, resized to the video's size; the others are it moved "
             "(null: text-to-video)",
    "model": "toyworld (ships with t2vz) or a t2vz model folder (python -m weights_convert CHECKPOINT FOLDER)",
    "lora": "LoRA files merged into the model's weights: [FILE:SCALE,...], SCALE 1.0 if left out (docs/lora.md)",
    "seed": "seeds every random draw: same seed, same video",
    "device": "auto: cuda if available, else cpu; or cpu, cuda, cuda:N",
    "dtype": "weights and activations (fp16 keeps the VAE in fp32: it can overflow fp16)",
    "compile": "torch.compile the UNet (compiles first: ~25 s for a tiny UNet on 2 CPU cores; docs/performance.md)",
    "video.num_frames": "frames per video",
    "video.height": "pixels, a multiple of 8 (also video.width); null: the model's own size",
    "video.num_videos_per_prompt": "videos per run: video_0.mp4, video_1.mp4, ...",
    "sampler.num_inference_steps": "DDIM steps",
    "sampler.guidance_scale": "classifier-free guidance weight",
    "method.motion_strength": "lambda: motion per frame, in pixels of a 512x512 frame (null: the model's own, "
                              "{paper[motion_strength]:g} for SD 1.5 as in the paper, {toy[motion_strength]:g} for "
                              "toyworld)",
    "method.direction": "delta = [dx, dy], the motion's direction",
    "method.t0": "motion is added between DDIM steps t0 <= t1, counted from the end (also method.t1); null: the "
                 "model's own, {paper[t0]} and {paper[t1]} for SD 1.5 as in the paper, {toy[t0]} and {toy[t1]} for "
                 "toyworld",
    "method.delta_t": "Delta t = t1 - t0 DDIM steps; with method.t0 null, t0 = t1 - delta_t (null: unused)",
    "method.cross_frame": "what self-attention of every frame looks at",
    "method.cross_frame_levels": "an ablation: only these UNet levels (0: full latent resolution) mix frames, "
                                 "e.g. [0]; null: every level, the paper",
    "method.motion_dynamics": "false: independent noise per frame (the paper's ablation)",
    "method.smooth_bg": "background smoothing (Sec. 3.3) with weight method.alpha",
    "method.smoothing": "paper: every step; authors: once, at T1",
    "method.mask_tokens": "words of the prompt that give the foreground mask (null: all)",
    "method.inversion_guidance_scale": "with image=: the guidance the picture is DDIM-inverted with (1: none)",
    "fast.merging_ratio": "token merging: this fraction of the tokens merged before self-attention (0: exact)",
    "fast.cache_interval": "feature caching: a full UNet pass every N steps, the shallow branch between (1: exact)",
    "fast.cache_branch": "feature caching: the skip branch that runs on cached steps (0: the shallowest)",
    "output.formats": "video files; a contact sheet {stem}_sheet.png is always written",
    "output.fps": "frames per second of the video files",
    "trace": "also write trace.png and trace/: each step of Algorithm 1 decoded and labelled (docs/method.md)",
}


def override_syntax(value: Any) -> str:
    """A value as it is written on the command line: null, false, [mp4,gif]."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_syntax(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return str(value)


def option_lines(node, key_options: dict[str, str], choices: dict[str, tuple]) -> str:
    """`--help`'s table: one line per key of `key_options`, `key=DEFAULT  what it does (allowed values)`, with the
    defaults read from the config dataclass `node` (`key=...` where required)."""
    defaults = OmegaConf.structured(node)
    lines = []
    for key, text in key_options.items():
        parent, _, leaf = key.rpartition(".")
        if OmegaConf.is_missing(OmegaConf.select(defaults, parent) if parent else defaults, leaf):
            option = f"{key}=..."
        else:
            value = OmegaConf.select(defaults, key)
            option = f"{key}={override_syntax(OmegaConf.to_object(value) if OmegaConf.is_config(value) else value)}"
        allowed = f" ({' | '.join(map(str, choices[key]))})" if key in choices else ""
        lines.append(f"  {option:<32} {text}{allowed}")
    return "\n".join(lines)


# The end of every `--help` template: Hydra fills in the config groups, the composed config and the footer.
HYDRA_HELP_TAIL = """== Configuration groups (group=option) ==
$APP_CONFIG_GROUPS
== Config, with the overrides given ==
$CONFIG
${hydra.help.footer}"""


def help_template() -> str:
    """The `--help` text: what the command does, key options with defaults, examples, where outputs go."""
    own = {"paper": PAPER_METHOD, "toy": model_method_defaults("toyworld")}  # read from the shipped folder
    described = {k: v.format(**own) if k in MODEL_OWN_KEYS else v for k, v in KEY_OPTIONS.items()}
    options = option_lines(GenerateConfig, described, CHOICES)
    return f"""\
t2vz: Text2Video-Zero on Stable Diffusion 1.5 (Khachatryan et al., ICCV 2023): a short video from a text
prompt with a text-to-image model, zero-shot: no training, no video data.

Usage: python -m t2vz prompt="TEXT" [model=MODEL_FOLDER] [key=value ...]
       python -m t2vz -m prompt="TEXT" [model=MODEL_FOLDER] key=a,b ...    (a sweep: one job per value)
Without model=..., the toy model that ships with t2vz (trained on a procedural world of coloured shapes; 64x64).

Key options, with their defaults (every key of the config below can be set with key=value):
{options}

Examples:
  python -m t2vz prompt="a red circle on grass" method.direction=[0,1]
  python -m t2vz prompt="a red circle on grass" image=scene.png       (image-to-video: frame 1 is scene.png)
  python -m t2vz prompt="a horse galloping on the street" model=models/sd15
  python -m t2vz prompt="a horse galloping on the street" model=models/sd15 lora=[loras/style.safetensors:0.8]
  python -m t2vz -m prompt="a panda surfing on a wave" model=models/sd15 method.motion_strength=0,12,24

Outputs go to Hydra's run folder outputs/DATE/TIME/ (a sweep: multirun/DATE/TIME/JOB_NUMBER/; choose it with
hydra.run.dir=PATH, or hydra.sweep.dir=PATH with -m): video.mp4, video.gif, video_sheet.png (video_0.*, video_1.*,
... for several videos per prompt), config.yaml (the resolved config) and run.json (versions, device, dtype, seed,
the LoRAs' files, sha256 and scales, the image's file and sha256 and frame 1's error against it, wall time, file
names).

{HYDRA_HELP_TAIL}"""


def register() -> ConfigStore:
    """Store `generate`, its groups' `default` options, the `--help` text and the job name in the ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="generate", node=GenerateConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name="default", node=node)
    cs.store(group="hydra/help", name="t2vz", node={
        "app_name": "t2vz",
        "header": "",
        "footer": "Powered by Hydra (https://hydra.cc); python -m t2vz --hydra-help shows Hydra's own options.\n",
        "template": help_template(),
    })
    cs.store(group="hydra/job", name="t2vz", package="hydra.job", node={"name": "t2vz"})  # log file t2vz.log
    cs.store(group="hydra/callbacks", name="t2vz", package="hydra.callbacks",
             node={"output_folder": {"_target_": "t2vz.experiment.run.OutputFolderCheck"},
                   "sweep_failures": {"_target_": "t2vz.experiment.run.SweepFailures"}})
    cs.store(name="experiment_config", node=ExperimentConfig)
    for group in ("logger", "metrics"):
        cs.store(group=group, name="default", node=EXPERIMENT_GROUPS[group])
    cs.store(group="hydra/callbacks", name="experiment", package="hydra.callbacks", node={
        "output_folder": {"_target_": "t2vz.experiment.run.OutputFolderCheck"},
        "multirun_summary": {"_target_": "t2vz.experiment.tracking.MultirunSummary"},
    })
    return cs


register()
