"""The editing papers' comparison as one multirun (`experiments/paper_editing.py`): for each (source video, source
prompt, instruction, edited prompt) pair, three methods measured as Tune-A-Video (Wu et al., ICCV 2023) measures
editing methods.

    method=video_instruct_pix2pix      Video Instruct-Pix2Pix (Text2Video-Zero Sec. 3.5, `method.instruct`): the
                                       instruction, cross-frame attention on (as experiments/instruct_video.py)
    method=framewise_instruct_pix2pix  the same with cross-frame attention off: Instruct-Pix2Pix frame by frame
    method=tune_a_video                Tune-A-Video (`method.tune_a_video`): tune on the source video and its
                                       prompt, DDIM-invert the source, sample the edited prompt; the tuned weights
                                       are cached per source and seed in `cache_dir`, so the edits of one source
                                       share one tuning

One job = one method × one pair (`pair`, an index into the pairs) × one `seed`. `pairs` null: the toy world's
pairs (`toy_pairs`, source videos rendered by `toyworld.world.render_video`, nothing to download); else a pairs
file (`read_pairs`: YAML or JSON lines; its format is in experiments/paper_editing.py's docstring).

A method that cannot run on the models given is skipped, not failed (`skip_reason`, read from the folders'
t2vz_model.json, no weights loaded): metrics.json gets `"status": "skipped"` and `"error"`, the reason. The toy
world has no InstructPix2Pix model, so on it both Instruct-Pix2Pix methods are skipped unless
`instruct_model=FOLDER` names one. Skipped is neither ok nor failed: a sweep of ok and skipped jobs exits 0.

Metrics of an ok job, against the edited prompt (`edit_metrics`): `textual_faithfulness` (`ClipScorer`: the CLIP
score of all frames; the same number as `clip_score`, recorded once), `frame_consistency` and
`frame_consistency_consecutive` (100 · mean cosine of CLIP image embeddings over all pairs / consecutive pairs of
frames), by the CLIP model `metrics.clip` (named in metrics.json as `clip_model`; null: no CLIP metrics); the
model-free `metrics.video_metrics` (`warp_error`, `flow_warp_error`, `frame_difference`, `motion_dx_mean`,
`motion_dy_mean`); `generate_s`, the edit's seconds (Tune-A-Video: inversion and sampling; its tuning is `tune_s`,
null where the cache served it); on the toy world also the judge's reading of the edit (`judge_edit`, as
experiments/toy_editing.py measures it: edit_ok, colour_ok, shape_ok, background_ok, all_ok, object_motion_error,
object_speed).

The toy world's shared pieces (`SOURCES`, `source_scene`, `edit_caption`, `judge_edit`) are also
experiments/toy_editing.py's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .. import __version__
from ..sd.loading import DTYPES
from ..sd.model_folder import SDXL, model_family, read_model_config, resolve_model_path
from ..toyworld.judge import background_kind, judge_image, object_motion_error, object_track
from ..toyworld.world import BACKGROUNDS, SIZE, caption, parse_caption, render_video, sample_scene
from ..video_io import contact_sheet, load_frames, resize_frames, resized_shape, to_uint8, write_image, write_outputs
from ..video_io import write_npz, write_text
from .config import HYDRA_HELP_TAIL, MetricsConfig, OutputConfig, check_choice, check_int, option_lines
from .tracking import LoggerConfig

# ------------------------------------------------------------------------------------------- the toy world
EDITS = ("colour", "shape", "background")
# the source scenes, one per index: (colour, shape, background)
SOURCES = (("red", "circle", "grass"), ("blue", "square", "sand"), ("yellow", "triangle", "wall"),
           ("green", "diamond", "floor"), ("purple", "square", "snow"))
# what each edit turns a source attribute into
NEW_COLOUR = {"red": "blue", "blue": "yellow", "yellow": "purple", "green": "red", "purple": "green"}
NEW_SHAPE = {"circle": "square", "square": "circle", "triangle": "diamond", "diamond": "triangle"}
NEW_BACKGROUND = {"grass": "snow", "sand": "floor", "wall": "grass", "floor": "sand", "snow": "wall"}
# the toy pairs: (source index, edit), two edits of each of four sources, every kind of edit at least twice
TOY_EDITS = ((0, "colour"), (0, "background"), (1, "shape"), (1, "colour"), (2, "background"), (2, "shape"),
             (3, "colour"), (3, "background"))
TOY_SOURCE = "toyworld:"  # a toy pair's `video`: toyworld:N, the source scene N of SOURCES, rendered


def source_scene(seed: int, travel: float):
    """The scene of source `seed` (`SOURCES`, cycled), its object moved so that `travel` pixels to the right keep it
    in view (negative: to the left)."""
    colour, shape, background = SOURCES[seed % len(SOURCES)]
    scene = sample_scene(np.random.default_rng(1000 + seed), seed=1000 + seed, background=background,
                         things=[(colour, shape)])
    thing = scene.things[0]
    cx = thing.r + 2 if travel >= 0 else SIZE - thing.r - 2  # the path's start: the side it moves away from
    return dataclasses.replace(scene, things=(dataclasses.replace(thing, cx=float(cx)),))


def edit_caption(colour: str, shape: str, background: str, edit: str) -> str:
    """The caption of a toy scene after `edit` (colour, shape or background: `NEW_COLOUR`, ...)."""
    if edit == "colour":
        colour = NEW_COLOUR[colour]
    elif edit == "shape":
        shape = NEW_SHAPE[shape]
    else:
        background = NEW_BACKGROUND[background]
    return caption(background, [(colour, shape)])


def edit_instruction(colour: str, shape: str, background: str, edit: str) -> str:
    """The Instruct-Pix2Pix instruction of an edit: "make the circle blue", "turn the circle into a square",
    "put it on snow"."""
    if edit == "colour":
        return f"make the {shape} {NEW_COLOUR[colour]}"
    if edit == "shape":
        return f"turn the {shape} into a {NEW_SHAPE[shape]}"
    return f"put it on {BACKGROUNDS[NEW_BACKGROUND[background]]}"


def judge_edit(frames, text: str, edit: str, velocity: float) -> dict:
    """The toy judge's reading of an edited video against its edited caption `text`, as fractions of frames:
    edit_ok (the edited attribute seen), colour_ok, shape_ok (colour and shape), background_ok, all_ok (shape and
    background); object_motion_error (pixels a frame between the object's centroid motion and `velocity` to the
    right) and object_speed (its mean x motion a frame)."""
    [(colour, _)], background = parse_caption(text)
    verdicts = [judge_image(f, text) for f in frames]
    colour_ok = np.array([v["colour_ok"] for v in verdicts], dtype=float)
    shape_ok = np.array([v["shape_ok"] for v in verdicts], dtype=float)
    background_ok = np.array([background_kind(f) == background for f in np.asarray(frames)], dtype=float)
    edit_ok = {"colour": colour_ok, "shape": shape_ok, "background": background_ok}[edit]
    track = object_track(frames, colour)
    speed = np.nanmean(track[1:, 1] - track[:-1, 1]) if np.isfinite(track).all(1).sum() > 1 else float("nan")
    return {"edit_ok": float(edit_ok.mean()), "colour_ok": float(colour_ok.mean()),
            "shape_ok": float(shape_ok.mean()), "background_ok": float(background_ok.mean()),
            "all_ok": float((shape_ok * background_ok).mean()),
            "object_motion_error": object_motion_error(frames, colour, (velocity, 0.0)),
            "object_speed": float(speed)}


# ------------------------------------------------------------------------------------------------- the pairs
PAIR_KEYS = ("video", "prompt", "instruction", "edited_prompt")


@dataclass(frozen=True)
class EditPair:
    """One edit: the source `video` (a file or a folder of frames; `toyworld:N` for a toy source), what it shows
    (`prompt`, Tune-A-Video tunes on it), the Instruct-Pix2Pix `instruction` and the `edited_prompt` (Tune-A-Video
    samples it; the metrics score against it). `edit`: the toy edit's kind (colour, shape, background), None for
    a file's pair."""

    video: str
    prompt: str
    instruction: str
    edited_prompt: str
    edit: Optional[str] = None

    @property
    def toy_source(self) -> Optional[int]:
        return int(self.video.removeprefix(TOY_SOURCE)) if self.video.startswith(TOY_SOURCE) else None


def toy_pairs() -> list[EditPair]:
    """The toy world's pairs (`TOY_EDITS`): the caption of a source scene, an instruction and the edited caption."""
    pairs = []
    for index, edit in TOY_EDITS:
        colour, shape, background = SOURCES[index]
        pairs.append(EditPair(f"{TOY_SOURCE}{index}", caption(background, [(colour, shape)]),
                              edit_instruction(colour, shape, background, edit),
                              edit_caption(colour, shape, background, edit), edit))
    return pairs


def _pair_entries(path: Path, text: str) -> list:
    """The raw entries of a pairs file: a YAML list (.yaml, .yml), or JSON lines (.jsonl, .json: one object a
    line, blank lines skipped; a .json holding one JSON list is read as that list)."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            entries = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"pairs={path} is not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(entries, list):
            raise ValueError(f"pairs={path} must hold a YAML list of pairs (- video: ..., prompt: ..., "
                             f"instruction: ..., edited_prompt: ...), not a {type(entries).__name__}")
        return entries
    if suffix in (".jsonl", ".json"):
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                return list(json.loads(text))
            except json.JSONDecodeError as e:
                raise ValueError(f"pairs={path} is not valid JSON ({e})") from None
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"pairs={path}: line {number} is not a JSON object ({e}); write one pair a line, "
                                 '{"video": ..., "prompt": ..., "instruction": ..., "edited_prompt": ...}') from None
        return entries
    raise ValueError(f"pairs={path} has the suffix {path.suffix or '(none)'!r}; give a .yaml/.yml file (a YAML list "
                     "of pairs) or a .jsonl/.json file (JSON lines, one pair a line)")


def read_pairs(path: str | Path) -> list[EditPair]:
    """The pairs of a pairs file (YAML or JSON lines, `_pair_entries`), each a mapping with exactly the keys
    `PAIR_KEYS` as non-empty strings. A relative `video` is read from the pairs file's folder. ValueError naming
    the file, the pair and what to write, for: no such file, a parse error, a missing or unknown key, an empty value,
    a video that does not exist, no pairs at all."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs={path}: no such file; give a pairs file (YAML or JSON lines, experiments/"
                         "paper_editing.py --help shows the format) or pairs=null for the toy world's pairs")
    entries = _pair_entries(path, path.read_text(encoding="utf-8"))
    if not entries:
        raise ValueError(f"pairs={path} holds no pair; write at least one (video, prompt, instruction, edited_prompt)")
    pairs = []
    for i, entry in enumerate(entries):
        where = f"pairs={path}: pair {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}, not a mapping of {', '.join(PAIR_KEYS)}")
        missing = [k for k in PAIR_KEYS if k not in entry]
        unknown = sorted(set(entry) - set(PAIR_KEYS), key=str)
        if missing or unknown:
            problem = (f"has no {', '.join(missing)}" if missing
                       else f"has the unknown key(s) {', '.join(map(str, unknown))}")
            raise ValueError(f"{where} {problem}; each pair needs exactly {', '.join(PAIR_KEYS)}")
        bad = [k for k in PAIR_KEYS if not isinstance(entry[k], str) or not entry[k].strip()]
        if bad:
            raise ValueError(f"{where}: {bad[0]}={entry[bad[0]]!r} must be a non-empty string")
        video = Path(entry["video"]).expanduser()
        video = video if video.is_absolute() else path.parent / video
        if not video.exists():
            raise ValueError(f"{where}: video {entry['video']} not found (looked for {video}; a relative path is "
                             "read from the pairs file's folder)")
        pairs.append(EditPair(str(video), entry["prompt"].strip(), entry["instruction"].strip(),
                              entry["edited_prompt"].strip()))
    return pairs


def load_pairs(pairs: Optional[str]) -> list[EditPair]:
    """`pairs` null: the toy world's (`toy_pairs`); else `read_pairs` of the file."""
    return toy_pairs() if pairs is None else read_pairs(pairs)


def select_pair(pairs: Optional[str], index: int) -> EditPair:
    """Pair `index` of `load_pairs(pairs)`; ValueError naming the valid range."""
    all_pairs = load_pairs(pairs)
    if not 0 <= index < len(all_pairs):
        what = "the toy world's pairs" if pairs is None else f"pairs={pairs}"
        raise ValueError(f"pair={index} is out of range: {what} has {len(all_pairs)} pairs, "
                         f"pair=0..{len(all_pairs) - 1}")
    return all_pairs[index]


def pair_range(pairs: Optional[str]) -> str:
    """Every pair index of `pairs` as a sweep's values, `range(0,N)`: what the `t2vz_pair_range` resolver
    (registered in `config`) gives conf/experiment/paper_editing.yaml's `pair`, so the sweep covers the file.

    Hydra resolves it while it sets the sweep up, where a ValueError would reach the user as pages of OmegaConf's
    traceback: a bad pairs file ends the command here instead, with one line and exit status 2."""
    try:
        return f"range(0,{len(load_pairs(pairs))})"
    except ValueError as e:
        print(f"paper_editing: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------------------------------------ the config
METHODS = ("video_instruct_pix2pix", "framewise_instruct_pix2pix", "tune_a_video")
CROSS_FRAME = {"video_instruct_pix2pix": "first", "framewise_instruct_pix2pix": "off"}  # the Instruct-Pix2Pix ones
CHOICES = {"method": METHODS, "instruct.dtype": tuple(DTYPES)}
NO_INSTRUCT_MODEL = "set instruct_model=FOLDER, an InstructPix2Pix model folder (weights_convert converts one)"
CLIP_METRICS = ("textual_faithfulness", "frame_consistency", "frame_consistency_consecutive")
VIDEO_METRICS = ("warp_error", "flow_warp_error", "frame_difference", "motion_dy_mean", "motion_dx_mean")
JUDGE_METRICS = ("edit_ok", "colour_ok", "shape_ok", "background_ok", "all_ok", "object_motion_error", "object_speed")
SIZE_MULTIPLE = 64  # frames are resized to multiples of 64, as Video Instruct-Pix2Pix's authors resize


def _check_number(key: str, value: Any, low: float = 0.0, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{key}={value!r} must be a finite number {'>' if strict else '>='} {low:g}")


@dataclass
class InstructSettings:
    """Video Instruct-Pix2Pix's sampling: InstructPix2Pix's two guidance weights (text, source image) and the
    model's dtype (fp16 on a GPU)."""

    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    dtype: str = "fp32"

    def __post_init__(self):
        _check_number("instruct.guidance_scale", self.guidance_scale)
        _check_number("instruct.image_guidance_scale", self.image_guidance_scale)
        check_choice("instruct.dtype", self.dtype, CHOICES)


@dataclass
class TuneSettings:
    """Tune-A-Video (the authors' recipe: 500 steps of AdamW at 3e-5, the edit sampled at guidance 12.5); it tunes
    in float32."""

    steps: int = 500
    lr: float = 3e-5
    guidance_scale: float = 12.5
    gradient_checkpointing: bool = False  # less memory, more time; the same weights

    def __post_init__(self):
        check_int("tune.steps", self.steps, 1)
        _check_number("tune.lr", self.lr, strict=True)
        _check_number("tune.guidance_scale", self.guidance_scale)


@dataclass
class PaperEditingConfig:
    """`python experiments/paper_editing.py`: one editing method on one (source, instruction, edited prompt) pair."""

    defaults: list[Any] = field(default_factory=lambda: [
        "_self_", {"output": "default"}, {"logger": "default"}, {"hydra/job": "t2vz"},
        {"override hydra/callbacks": "experiment"}, {"override hydra/help": "paper_editing"}])
    method: str = "video_instruct_pix2pix"
    pair: int = 0  # index into the pairs
    pairs: Optional[str] = None  # a pairs file (YAML or JSON lines); None: the toy world's pairs
    seed: int = 0
    model: str = "toyworld"  # Tune-A-Video's model: a t2vz SD 1.5 model folder or a shipped model
    instruct_model: Optional[str] = None  # the Instruct-Pix2Pix methods' model: a t2vz InstructPix2Pix folder
    num_frames: int = 8  # the first N frames of each source video (toy: N frames rendered)
    resolution: Optional[int] = None  # long side of the frames (multiple of 64); None: `model`'s own size
    num_inference_steps: int = 50  # DDIM steps of every method (and of Tune-A-Video's inversion)
    velocity: float = 4.0  # toy sources: the object's motion, pixels a frame to the right
    device: str = "auto"
    cache_dir: str = "${hydra:runtime.cwd}/outputs/paper_editing_cache"  # Tune-A-Video's tuned weights
    name: str = "paper_editing"
    instruct: InstructSettings = field(default_factory=InstructSettings)
    tune: TuneSettings = field(default_factory=TuneSettings)
    output: OutputConfig = field(default_factory=OutputConfig)
    resume: bool = True  # a point complete already (same config) is skipped (`resume.Point`); false: run it again
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(headline="textual_faithfulness"))

    def __post_init__(self):
        check_choice("method", self.method, CHOICES)
        check_int("pair", self.pair, 0)
        check_int("seed", self.seed, 0)
        check_int("num_frames", self.num_frames, 2)  # frame consistency compares frames
        check_int("num_inference_steps", self.num_inference_steps, 2)
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or self.resolution < SIZE_MULTIPLE or self.resolution % SIZE_MULTIPLE):
            raise ValueError(f"resolution={self.resolution!r} must be a multiple of {SIZE_MULTIPLE} (e.g. 512), or "
                             "null for the model's own size")
        _check_number("velocity", self.velocity, low=-float("inf"))
        if self.metrics.clip_name is None and self.metrics.headline in CLIP_METRICS:
            raise ValueError(f"metrics.headline={self.metrics.headline} needs a CLIP model and metrics.clip is null; "
                             "set metrics.clip=FOLDER, or metrics.headline=flow_warp_error")


def to_config(cfg: DictConfig) -> PaperEditingConfig:
    """The composed config → `PaperEditingConfig`, every value checked (ValueError naming the key)."""
    return OmegaConf.to_object(cfg)


def release_config_group(name: str) -> None:
    """Drop the config group `name` from this process's ConfigStore. Hydra reads `name=value` on the command line
    as the choice of an option of a group of that name, and t2vz.experiment.config registers a `method` group
    (Text2Video-Zero's λ, t0, t1, ...) that experiments/paper_editing.py and toy_editing.py do not use: their
    `method` is a plain key. Each entry point calls this before Hydra composes, in its own process only."""
    ConfigStore.instance().repo.pop(name, None)


# ------------------------------------------------------------------------------------------------ the jobs
def _unet_channels(meta: dict) -> tuple[int, int, int]:
    """(UNet in, UNet out, VAE latent) channels of a model folder's t2vz_model.json."""
    unet, vae = meta.get("unet", {}), meta.get("vae", {})
    latent = int(vae.get("latent_channels", 4))
    return int(unet.get("in_channels", latent)), int(unet.get("out_channels", latent)), latent


def skip_reason(config: PaperEditingConfig) -> Optional[str]:
    """Why `config.method` cannot run on the models given (None: it can), read from the model folders'
    t2vz_model.json without loading weights: no instruct_model; an instruct_model that is SDXL or whose UNet is not
    an 8-channel InstructPix2Pix UNet; Tune-A-Video on an SDXL model or on an InstructPix2Pix UNet. A folder that
    is not a model folder at all is a ModelFolderError (the job fails: a wrong path is a mistake, not a skip)."""
    if config.method in CROSS_FRAME:
        if config.instruct_model is None:
            return NO_INSTRUCT_MODEL
        meta = read_model_config(resolve_model_path(config.instruct_model))
        if model_family(meta) == SDXL:
            return (f"instruct_model={config.instruct_model} is an SDXL model; Video Instruct-Pix2Pix runs on SD 1.5 "
                    "InstructPix2Pix models")
        c_in, c_out, latent = _unet_channels(meta)
        if c_in != c_out + latent:
            return (f"instruct_model={config.instruct_model} has a {c_in}-channel UNet, not an InstructPix2Pix UNet "
                    f"({c_out} + {latent} = {c_out + latent} channels: noisy latent and source latent); "
                    f"{NO_INSTRUCT_MODEL}")
        return None
    meta = read_model_config(resolve_model_path(config.model))
    if model_family(meta) == SDXL:
        return f"model={config.model} is an SDXL model; Tune-A-Video (t2vz.method.tune_a_video) runs on SD 1.5 models"
    c_in, _, latent = _unet_channels(meta)
    if c_in != latent:
        return (f"model={config.model} has a {c_in}-channel UNet (an InstructPix2Pix model?); Tune-A-Video tunes a "
                "text-to-image model: set model= to an SD 1.5 model folder")
    return None


def frame_size(config: PaperEditingConfig) -> Optional[int]:
    """The long side the frames are resized to: `resolution`, else `model`'s own size (its folder's sample_size:
    64 for the toy model, 512 for SD 1.5)."""
    if config.resolution is not None:
        return config.resolution
    meta = read_model_config(resolve_model_path(config.model))
    return int(meta.get("sample_size", 1024 if model_family(meta) == SDXL else 512))


def source_frames(pair: EditPair, config: PaperEditingConfig) -> torch.Tensor:
    """The pair's source video, (num_frames, H, W, 3) floats in [0, 1]: a toy source rendered (its object moving
    `velocity` pixels a frame over the still background), a file's first `num_frames` frames; then resized so the
    long side is `frame_size`, each side a multiple of 64 (every method edits the same frames)."""
    index = pair.toy_source
    if index is not None:
        scene = source_scene(index, config.velocity * (config.num_frames - 1))
        frames = torch.from_numpy(render_video(scene, config.num_frames, (config.velocity, 0.0))).float() / 255
    else:
        frames = load_frames(pair.video, "video", max_frames=config.num_frames)
        if len(frames) < config.num_frames:
            raise ValueError(f"num_frames={config.num_frames} but the pair's video {pair.video} has only "
                             f"{len(frames)} frames; pass num_frames <= {len(frames)}")
    h, w = frames.shape[1:3]
    return resize_frames(frames, resized_shape(h, w, frame_size(config), SIZE_MULTIPLE))


def _video_id(pair: EditPair, config: PaperEditingConfig) -> str:
    """What identifies the source's pixels: the toy source and its motion, or the file's (files') sha256."""
    if pair.toy_source is not None:
        return f"{pair.video}:v{config.velocity:g}"
    from ..sd.lora import file_sha256

    video = Path(pair.video)
    files = sorted(p for p in video.iterdir() if p.is_file()) if video.is_dir() else [video]
    return ",".join(file_sha256(p) for p in files)


def tuned_cache_file(pair: EditPair, config: PaperEditingConfig, size: tuple[int, int]) -> Path:
    """Where Tune-A-Video's weights tuned on this pair's source are cached: one file per model, source video, source
    prompt, frame count and size, tuning recipe and seed, so the edits of one source share one tuning."""
    model = resolve_model_path(config.model)
    unet = model / "unet.safetensors"
    stat = unet.stat() if unet.is_file() else None
    key = {"model": str(model.resolve()), "unet": [stat.st_size, stat.st_mtime_ns] if stat else None,
           "video": _video_id(pair, config), "prompt": pair.prompt, "frames": config.num_frames, "size": list(size),
           "steps": config.tune.steps, "lr": config.tune.lr, "seed": config.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(pair.video).stem if pair.toy_source is None else pair.video)
    return Path(config.cache_dir) / f"{model.name}-{stem}-seed{config.seed}-{digest}.safetensors"


def instruct_edit(config: PaperEditingConfig, pair: EditPair, frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Video Instruct-Pix2Pix (cross-frame attention "first") or frame by frame ("off") on the frames:
    (edited frames, {"generate_s"})."""
    from .conditional_runs import cached_instruct_video

    pipe = cached_instruct_video(config.instruct_model, config.device, config.instruct.dtype, False, ())
    s = config.instruct
    start = time.perf_counter()
    edited = pipe(pair.instruction, video=frames, guidance_scale=s.guidance_scale,
                  image_guidance_scale=s.image_guidance_scale, num_inference_steps=config.num_inference_steps,
                  resolution=None, size_multiple=8, cross_frame=CROSS_FRAME[config.method],
                  generator=torch.Generator().manual_seed(config.seed), progress=config.output.progress)
    return edited, {"generate_s": time.perf_counter() - start}


def tune_a_video_edit(config: PaperEditingConfig, pair: EditPair, frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Tune-A-Video: the weights tuned on the source video and its prompt (from the cache, else tuned here and
    cached), then the source inverted and the edited prompt sampled: (edited frames, {"generate_s", "tune_s",
    "tuned_file", "tune_loss_final"}); tune_s and the loss are NaN where the cache served the weights."""
    from ..method.tune_a_video import TuneAVideo
    from .run import resolve_device

    h, w = frames.shape[1:3]
    cache = tuned_cache_file(pair, config, (h, w))
    device = resolve_device(config.device)
    info: dict[str, Any] = {"tune_s": float("nan"), "tune_loss_final": float("nan"), "tuned_file": str(cache)}
    if cache.is_file():
        pipe = TuneAVideo.from_pretrained(config.model, tuned=cache, device=device)
    else:
        pipe = TuneAVideo.from_pretrained(config.model, device=device)
        t = config.tune
        start = time.perf_counter()
        losses = pipe.tune(frames, pair.prompt, height=h, width=w, steps=t.steps, lr=t.lr,
                           gradient_checkpointing=t.gradient_checkpointing,
                           generator=torch.Generator().manual_seed(config.seed), progress=config.output.progress)
        info.update(tune_s=time.perf_counter() - start, tune_loss_final=losses[-1])
        cache.parent.mkdir(parents=True, exist_ok=True)
        pipe.save(cache)
    start = time.perf_counter()
    edited = pipe.edit(frames, pair.edited_prompt, num_inference_steps=config.num_inference_steps,
                       guidance_scale=config.tune.guidance_scale, height=h, width=w,
                       generator=torch.Generator().manual_seed(config.seed), progress=config.output.progress)
    info["generate_s"] = time.perf_counter() - start
    return edited, info


def edit_metrics(frames: torch.Tensor, pair: EditPair, scorer, velocity: float) -> dict[str, float]:
    """The metrics of an edited video (f, h, w, 3) against the pair's edited prompt: `metrics.video_metrics` without a
    scorer (the model-free ones); with a `ClipScorer`, textual_faithfulness and frame consistency (all pairs,
    consecutive pairs); for a toy pair, the judge's reading (`judge_edit`)."""
    from .metrics import video_metrics

    metrics = video_metrics(frames, pair.edited_prompt, None)
    if scorer is not None:
        metrics["textual_faithfulness"] = scorer.textual_faithfulness(frames, pair.edited_prompt)
        metrics.update(scorer.frame_consistency(frames))
    if pair.edit is not None:
        metrics.update(judge_edit(frames, pair.edited_prompt, pair.edit, velocity))
    return metrics


def metric_names(config: PaperEditingConfig, pair: EditPair) -> list[str]:
    """The metrics an ok job of `config` on `pair` records (what `metrics.headline` may name)."""
    names = [*VIDEO_METRICS, "generate_s"]
    if config.method == "tune_a_video":
        names.append("tune_s")
    if config.metrics.clip_name:
        names += CLIP_METRICS
    if pair.edit is not None:
        names += JUDGE_METRICS
    return names


def load_scorer(config: PaperEditingConfig):
    """The CLIP scorer of `metrics.clip` (`run.cached_scorer`: the toy CLIP missing from this installation is a
    ValueError saying what to give instead), None for null."""
    from .run import cached_scorer

    name = config.metrics.clip_name
    return None if name is None else cached_scorer(name, config.device)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_job(folder: Path, frames: torch.Tensor, source: torch.Tensor, config: PaperEditingConfig, pair: EditPair,
              info: dict, config_yaml: str, start: float, extra: dict | None = None) -> list[str]:
    """The job's files, each written atomically: the edited video (`{stem}.mp4`, `.gif`, `_sheet.png`),
    `frames.npz` (uint8), `source_sheet.png`, `config.yaml` and `run.json` (versions, device, seed, method, the pair,
    the frames' shape, Tune-A-Video's tuned file, wall time, the files, and `extra`: the config hash and Slurm job,
    `resume.Point.run_info`). Returns the names written."""
    from .run import resolve_device

    out = config.output
    names = [p.name for p in write_outputs(folder, frames, stem=out.stem, fps=out.fps,
                                           formats=tuple(out.formats)).values()]
    write_npz(folder / "frames.npz", {"frames": to_uint8(frames)}, compressed=True)
    write_image(folder / "source_sheet.png", contact_sheet(source))
    write_text(folder / "config.yaml", config_yaml)
    names += ["frames.npz", "source_sheet.png", "config.yaml"]
    run = {"t2vz": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(resolve_device(config.device)), "seed": config.seed, "method": config.method,
           "pair": {"index": config.pair, **dataclasses.asdict(pair)}, "frames": list(frames.shape),
           **{k: _json_value(v) for k, v in info.items() if k in ("tuned_file", "tune_loss_final")},
           "wall_s": round(time.perf_counter() - start, 3), "outputs": names, **(extra or {})}
    write_text(folder / "run.json", json.dumps(run, indent=2) + "\n")
    return names + ["run.json"]


def run_editing_job(cfg: DictConfig) -> float:
    """One Hydra job of experiments/paper_editing.py: check the config, pick the pair, skip (with the reason) a
    method that cannot run on the models given, else edit, measure, write and log to W&B.

    metrics.json in every case: status "ok" (the metrics, `clip_model`), "skipped" or "failed" (with `error`).
    A single job that failed exits 2 after one line; in a sweep it is recorded and the other jobs run. Returns
    `metrics.headline` (NaN when skipped or failed). A point complete already is not run again (`resume.Point`, as
    in `run.run_experiment`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .resume import Point
    from .run import USER_ERRORS, job_run_id, job_start
    from .tracking import Tracker

    start = time.perf_counter()
    single = HydraConfig.get().mode == RunMode.RUN
    run_dir, record, logger = job_start(cfg)
    point = Point(cfg, run_dir)
    skipped = point.skip_or_begin(record, OmegaConf.select(cfg, "metrics.headline", default=None))
    if skipped is not None:  # complete already: skipped, its files untouched
        return skipped
    headline = float("nan")

    def failed(error: Exception) -> None:
        record.update(status="failed", error=" ".join(str(error).split()) or type(error).__name__)
        print(f"paper_editing: {'error' if single else f'job {run_dir.name} failed'}: {record['error']}",
              file=sys.stderr)

    reason = None
    try:
        config = to_config(cfg)
        pair = select_pair(config.pairs, config.pair)
        reason = skip_reason(config)
    except USER_ERRORS as e:
        failed(e)
    if record["status"] == "ok" and reason is not None:
        record.update(status="skipped", error=reason)
        print(f"paper_editing: job {run_dir.name} skipped: {reason}", file=sys.stderr)
    elif record["status"] == "ok":
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        with Tracker(logger, run_dir, OmegaConf.to_container(cfg, resolve=True), name=run_dir.name,
                     job_type="edit", run_id=job_run_id()) as tracker:
            try:
                names = metric_names(config, pair)
                if config.metrics.headline not in names:
                    raise ValueError(f"metrics.headline={config.metrics.headline!r} is not one of this job's "
                                     f"metrics: {', '.join(names)}")
                scorer = load_scorer(config)  # before the edit: a bad CLIP fails at once
                source = source_frames(pair, config)
                edit = tune_a_video_edit if config.method == "tune_a_video" else instruct_edit
                frames, info = edit(config, pair, source)
                metrics = {**edit_metrics(frames, pair, scorer, config.velocity),
                           **{k: v for k, v in info.items() if k in ("generate_s", "tune_s")}}
                written = write_job(run_dir, frames, source, config, pair, info, config_yaml, start,
                                    point.run_info())
                if scorer is not None:
                    record["clip_model"] = config.metrics.clip_name
                record.update({k: _json_value(v) for k, v in metrics.items()})
                tracker.log_metrics(metrics)
                if f"{config.output.stem}.mp4" in written:
                    tracker.log_video(run_dir / f"{config.output.stem}.mp4")
                tracker.log_image("contact_sheet", run_dir / f"{config.output.stem}_sheet.png")
                headline = metrics[config.metrics.headline]
            except USER_ERRORS as e:
                failed(e)
                tracker.fail(record["error"])
    write_text(run_dir / "metrics.json", json.dumps(record, indent=2) + "\n")
    point.end(record["status"])
    if record["status"] == "ok":
        print(f"paper_editing: job {run_dir.name} ok, {config.metrics.headline}={headline:.4g}; results in {run_dir}")
    elif record["status"] == "failed" and single:
        sys.exit(2)
    return headline


# ------------------------------------------------------------------------------------------------------ --help
OPTIONS = {
    "method": "the editing method",
    "pair": "which pair (index into the pairs); the declared sweep runs them all",
    "pairs": "a pairs file (YAML or JSON lines: video, prompt, instruction, edited_prompt); null: the toy pairs",
    "seed": "seeds every random draw (the noise, Tune-A-Video's tuning)",
    "model": "Tune-A-Video's model: toyworld (ships with t2vz) or a t2vz SD 1.5 model folder",
    "instruct_model": "the Instruct-Pix2Pix methods' model: a t2vz InstructPix2Pix folder (null: they are skipped)",
    "num_frames": "frames of each source video (the first N)",
    "resolution": "long side of the frames, a multiple of 64 (null: the model's own size)",
    "num_inference_steps": "DDIM steps of every method",
    "instruct.guidance_scale": "Instruct-Pix2Pix's text guidance",
    "instruct.image_guidance_scale": "Instruct-Pix2Pix's source-image guidance",
    "tune.steps": "Tune-A-Video's tuning steps",
    "tune.lr": "Tune-A-Video's learning rate (AdamW, constant)",
    "tune.guidance_scale": "Tune-A-Video's guidance when sampling the edit",
    "metrics.clip": "the CLIP model of the CLIP metrics: toyworld, a CLIPModel folder, or null",
    "metrics.headline": "the metric a job returns to the sweeper",
}


def help_template() -> str:
    return f"""\
The editing papers' comparison (Tune-A-Video, Wu et al. 2023): Video Instruct-Pix2Pix (cross-frame attention on),
Instruct-Pix2Pix frame by frame, and Tune-A-Video, each on (source video, prompt, instruction, edited prompt)
pairs, measured by textual faithfulness and frame consistency (CLIP) and the warp errors. A method that cannot run
on the models given is skipped with the reason.

Usage: python experiments/paper_editing.py -m +experiment=paper_editing [key=value ...]     (the whole sweep)
       python experiments/paper_editing.py method=tune_a_video pair=0 [key=value ...]       (one job)

Key options, with their defaults (every key of the config below can be set with key=value):
{option_lines(PaperEditingConfig, OPTIONS, CHOICES)}
  cache_dir=outputs/paper_editing_cache  Tune-A-Video's tuned weights, one file per source and seed

Examples:
  python experiments/paper_editing.py -m +experiment=paper_editing                      (the toy world)
  python experiments/paper_editing.py -m +experiment=paper_editing pairs=pairs.yaml model=models/sd15 \\
      instruct_model=models/ip2p metrics.clip=models/clip-vit-large-patch14
  python experiments/report.py multirun/DATE/TIME

Each job writes into its Hydra folder (multirun/DATE/TIME/N/ with -m): video.mp4, video.gif, video_sheet.png,
frames.npz, source_sheet.png, config.yaml, run.json and metrics.json (status ok, skipped or failed); W&B logging as
every experiment job (logger.mode=offline|online|disabled).

{HYDRA_HELP_TAIL}"""


def register() -> ConfigStore:
    cs = ConfigStore.instance()
    cs.store(name="paper_editing", node=PaperEditingConfig)
    cs.store(group="hydra/help", name="paper_editing", node={
        "app_name": "paper_editing", "header": "", "template": help_template(),
        "footer": "Powered by Hydra (https://hydra.cc); --hydra-help shows Hydra's own options.\n"})
    return cs


register()
