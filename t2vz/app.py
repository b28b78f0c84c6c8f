"""`t2vz-app` (or `python -m t2vz.app`): Text2Video-Zero in the browser, like the authors' Gradio demo.

Three tabs, one per job of the command line: text-to-video (`t2vz`), ControlVideo
(`python experiments/control_video.py`, Sec. 3.4) and Video Instruct-Pix2Pix (`python experiments/instruct_video.py`,
Sec. 3.5). The app holds no option handling of its own: each widget is one config key, its initial value the
config dataclass's default (but "Show how it was made", `trace`, on for the toy model: `start_value`), and pressing
Generate

    widgets → Hydra overrides `key=value` (`overrides`, only the values that differ from the defaults)
            → the same config the command line composes (`compose_config`), checked by the same code
              (`run.check_model_folders`, the job's `Task.to_config`), run by the same job function
              (`Task.load`, `Task.generate`) and written by the same `run.write_run`
            → the video, its contact sheet, config.yaml, and the command line that reproduces it (`command_line`);
              with "Show how it was made" (`trace=true`) also the generation's trace sheet, trace.png, each step of
              Algorithm 1 decoded and labelled (`method.trace`), in a collapsed "How it was made" section.

Bad values are the command line's one-line `t2vz: error: ...` message, shown in the page. Generations run one at a
time (one queue for all tabs), so two visitors cannot run the machine out of memory. The app binds 127.0.0.1;
`--host`, `--port` and `--share` are explicit choices (docs/app.md says what sharing exposes).

gradio is an optional extra (`pip install -e .[app]`), imported only when the page is built.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import re
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .experiment import conditional_runs, config as t2v_config
from .experiment.run import TEXT_TO_VIDEO, USER_ERRORS, Task, check_model_folders, config_trace, write_run
from .method.trace import write_trace
from .sd.model_folder import (
    CONFIG_FILE, CONTROLNET_FORMAT, FORMAT, SHIPPED_MODELS, ModelFolderError, model_method_defaults,
    read_meta, resolve_model_path,
)

TOY_MODEL = SHIPPED_MODELS[0]  # the app opens on the toy model: it ships with t2vz, so a fresh machine runs it
SEED_MAX = 2**31 - 1  # seed -1 draws a seed in [0, SEED_MAX]
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
# prompts per kind of model: the toy world's vocabulary (t2vz.toyworld.world) and the authors' demo prompts
TOY_EXAMPLES = ("a red circle on grass", "a blue square on sand", "a yellow triangle on snow",
                "a purple diamond on a striped wall", "a green circle and a red square on a checkered floor")
SD_EXAMPLES = ("an astronaut waving the arm on the moon", "a sloth surfing on a wakeboard",
               "an astronaut walking on a street", "a cute cat walking on grass", "a horse is galloping on a street",
               "an astronaut is skiing down the hill", "a gorilla walking alone down the street",
               "a gorilla dancing on times square", "a panda dancing like crazy on times square")
CONTROL_EXAMPLES = ("a red circle on grass", "an astronaut dancing in outer space", "a bear dancing on times square")
INSTRUCT_EXAMPLES = ("make it winter", "make it Van Gogh Starry Night style", "make it a pixel art",
                     "replace the horse with a zebra")


# ------------------------------------------------------------------------------------- the jobs and their keys
@dataclass(frozen=True)
class Field:
    """One widget: the config key it sets, its label (the method's name), the kind of widget, and, for `choice`,
    the allowed values; `info` is the help line under it."""

    key: str
    label: str
    kind: str = "number"  # number | int | text | list | prompt | choice | bool | slider | pair | video | image |
    #                       model | controlnet (list: comma-separated entries, e.g. LoRA files)
    info: str = ""
    choices: tuple = ()
    bounds: tuple[float, float, float] = (0.0, 1.0, 0.05)  # slider: minimum, maximum, step


@dataclass(frozen=True)
class Job:
    """A tab: the Hydra config it composes (`config_name`, in the ConfigStore), the command that runs the same
    config, the dataclass whose defaults the widgets start from, the `run.Task` that checks and runs it, and
    `fixed` overrides the app always adds (the experiments' W&B logging, which the app does not do)."""

    name: str
    config_name: str
    command: tuple[str, ...]
    node: type
    task: Task
    main: tuple[Field, ...]
    advanced: tuple[Field, ...]
    fixed: tuple[str, ...] = ()

    def fields(self) -> tuple[Field, ...]:
        return self.main + self.advanced


C = t2v_config.CHOICES
CROSS_FRAME = Field("cross_frame", "cross-frame attention", "choice", "what self-attention of every frame looks at",
                    conditional_runs.CHOICES["cross_frame"])
CHUNK = Field("chunk_size", "chunk size", "int", "frames per denoising chunk (empty: all at once)")
DTYPE = Field("dtype", "dtype", "choice", t2v_config.KEY_OPTIONS["dtype"], C["dtype"])
STEPS = Field("sampler.num_inference_steps", "DDIM steps", "int")
GUIDANCE = Field("sampler.guidance_scale", "guidance scale", "number", "classifier-free guidance weight")
NEGATIVE = Field("sampler.negative_prompt", "negative prompt", "text")
MERGING = Field("fast.merging_ratio", "token merging ratio", "slider", t2v_config.KEY_OPTIONS["fast.merging_ratio"],
                bounds=(0.0, 0.9, 0.05))
MERGING_LEVELS = Field("fast.merging_max_downsample", "token merging down to downsample", "choice",
                       "token merging at the UNet levels down to this downsampling (1: full latent resolution only)",
                       C["fast.merging_max_downsample"])
CACHE = Field("fast.cache_interval", "feature cache interval", "int", t2v_config.KEY_OPTIONS["fast.cache_interval"])
CACHE_BRANCH = Field("fast.cache_branch", "feature cache branch", "int", t2v_config.KEY_OPTIONS["fast.cache_branch"])
FAST = (MERGING, MERGING_LEVELS, CACHE, CACHE_BRANCH)
SEED = Field("seed", "seed", "int", "-1: a random seed (the seed used is shown with the result)")
LORA = Field("lora", "LoRA files", "list", "FILE or FILE:SCALE, comma-separated: merged into the model's weights "
             "(docs/lora.md)")
TRACE = Field("trace", "Show how it was made", "bool", "also draw each step of Algorithm 1 of this generation, "
              "decoded and labelled (trace.png); on by default for the toy model, where it costs about a second")

TEXT_TO_VIDEO_JOB = Job(
    "Text-to-video", "generate", ("t2vz",), t2v_config.GenerateConfig, TEXT_TO_VIDEO,
    main=(Field("prompt", "prompt", "prompt"), Field("model", "model", "model"),
          Field("video.num_frames", "frames", "int", "video length"), SEED,
          Field("image", "image (optional): frame 1", "image", "image-to-video: frame 1 is this picture, the other "
                "frames it moved; resized to the video's size (empty: text-to-video)"), TRACE),
    advanced=(
        Field("method.motion_strength", "λ (motion strength)", "number"),
        Field("method.direction", "δ = [δx, δy]", "pair", t2v_config.KEY_OPTIONS["method.direction"]),
        Field("method.t0", "t0", "int"), Field("method.t1", "t1", "int"),
        STEPS, GUIDANCE, NEGATIVE,
        Field("video.height", "height", "int", t2v_config.KEY_OPTIONS["video.height"]),
        Field("video.width", "width", "int", "pixels, a multiple of 8; empty: the model's own size"),
        Field("video.chunk_size", "chunk size", "int", CHUNK.info),
        Field("method.cross_frame", "cross-frame attention", "choice", t2v_config.KEY_OPTIONS["method.cross_frame"],
              C["method.cross_frame"]),
        Field("method.smooth_bg", "background smoothing", "bool", "Sec. 3.3: blend the background towards the "
              "warped first frame"),
        Field("method.alpha", "α (background smoothing weight)", "slider", bounds=(0.0, 1.0, 0.05)),
        Field("method.inversion_guidance_scale", "inversion guidance scale", "number",
              t2v_config.KEY_OPTIONS["method.inversion_guidance_scale"]),
        DTYPE, *FAST, LORA,
        Field("output.fps", "frames per second", "number"),
    ))

CONTROL_JOB = Job(
    "ControlVideo", "control_experiment", ("python", "experiments/control_video.py"),
    conditional_runs.ControlExperimentConfig, conditional_runs.CONTROL_VIDEO,
    main=(Field("prompt", "prompt", "prompt"), Field("model", "model", "model"),
          Field("controlnet", "ControlNet", "controlnet"),
          Field("control.video", "control video", "video", "edges are computed here (detector canny); pose or depth "
                "maps: upload them as a video with detector none"),
          Field("control.detector", "detector", "choice", conditional_runs.CONTROL_OPTIONS["control.detector"],
                conditional_runs.DETECTORS), SEED),
    advanced=(
        Field("control.low_threshold", "Canny low threshold", "number"),
        Field("control.high_threshold", "Canny high threshold", "number"),
        Field("control.num_frames", "frames", "int", conditional_runs.CONTROL_OPTIONS["control.num_frames"]),
        Field("control.resolution", "resolution", "int", conditional_runs.CONTROL_OPTIONS["control.resolution"]),
        Field("control.conditioning_scale", "ControlNet scale", "number"),
        STEPS, GUIDANCE, NEGATIVE, CROSS_FRAME, CHUNK, DTYPE, *FAST, LORA,
        Field("output.fps", "frames per second", "number"),
    ),
    fixed=("logger.enabled=false",))

INSTRUCT_JOB = Job(
    "Video Instruct-Pix2Pix", "instruct_experiment", ("python", "experiments/instruct_video.py"),
    conditional_runs.InstructExperimentConfig, conditional_runs.INSTRUCT_VIDEO,
    main=(Field("instruction", "instruction", "prompt"), Field("model", "model", "model"),
          Field("source.video", "video to edit", "video"), SEED),
    advanced=(
        Field("source.num_frames", "frames", "int", conditional_runs.INSTRUCT_OPTIONS["source.num_frames"]),
        Field("source.resolution", "resolution", "int", conditional_runs.INSTRUCT_OPTIONS["source.resolution"]),
        STEPS, Field("sampler.guidance_scale", "text guidance scale", "number"),
        Field("sampler.image_guidance_scale", "image guidance scale", "number"),
        NEGATIVE, CROSS_FRAME, CHUNK, DTYPE, *FAST, LORA,
        Field("output.fps", "frames per second", "number"),
    ),
    fixed=("logger.enabled=false",))

JOBS = (TEXT_TO_VIDEO_JOB, CONTROL_JOB, INSTRUCT_JOB)


def defaults_of(job: Job) -> dict[str, Any]:
    """Each field's default, read from the job's config dataclass (None where it is null or required)."""
    node = OmegaConf.structured(job.node)
    out = {}
    for f in job.fields():
        parent, _, leaf = f.key.rpartition(".")
        container = OmegaConf.select(node, parent) if parent else node
        value = None if OmegaConf.is_missing(container, leaf) else OmegaConf.select(node, f.key)
        out[f.key] = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    return out


# --------------------------------------------------------------------------------- overrides and command lines
PLAIN = re.compile(r"[A-Za-z_./][\w./-]*")
KEYWORDS = {"null", "true", "false", "nan", "inf"}


def hydra_value(value: Any) -> str:
    """A value in Hydra's override syntax: null, true, 1.5, [1.0,0.0], toyworld, "a red circle, on grass"
    (strings quoted unless plain; quotes and the backslashes before them escaped; `${` kept literal)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return t2v_config.override_syntax(value)
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if PLAIN.fullmatch(text) and text.lower() not in KEYWORDS:
        return text
    text = re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ('\\"' if m.group(2) else ""), text)
    return '"' + text.replace("${", "\\${") + '"'


def normalized(value: Any, default: Any, numeric: bool = False) -> Any:
    """A widget's value as the config holds it: "" is null, a whole float for an int key is an int, and the text of
    a numeric field that may be empty (`numeric`) is the number it spells (else Hydra's type check names it); the
    text of a list field is its comma-separated entries."""
    if isinstance(default, list) and isinstance(value, str):
        return [entry.strip() for entry in value.split(",") if entry.strip()]
    if isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, str) and numeric:
        for kind in (int, float):
            try:
                return kind(value.strip())
            except ValueError:
                pass
    if isinstance(value, float) and isinstance(default, int) and not isinstance(default, bool) and value.is_integer():
        return int(value)
    if isinstance(value, float) and value.is_integer() and default is None:
        return int(value)
    return value


def overrides(job: Job, values: dict[str, Any]) -> list[str]:
    """`key=value` for every field whose value differs from the config's default (the required keys and the seed
    always), then the job's fixed overrides: what the command line needs to compose the same config."""
    defaults = defaults_of(job)
    out = []
    for f in job.fields():
        if f.key not in values:
            continue
        value = normalized(values[f.key], defaults[f.key], f.kind in ("int", "number"))
        if f.key == "seed" or f.kind in ("prompt", "model", "controlnet", "video") or value != defaults[f.key]:
            if value is None and f.kind in ("prompt", "model", "controlnet", "video"):
                continue  # required and not given: the config's own check names it
            out.append(f"{f.key}={hydra_value(value)}")
    return out + list(job.fixed)


def command_line(job: Job, overrides_: list[str]) -> str:
    """The shell command that composes the same config: `t2vz 'prompt="a red circle on grass"' seed=3 ...`."""
    return shlex.join([*job.command, *overrides_])


_HYDRA = threading.Lock()  # Hydra's global state: one composition at a time


def compose_config(job: Job, overrides_: list[str]) -> DictConfig:
    """The config `job`'s command line composes from these overrides (the same ConfigStore nodes)."""
    from hydra import compose, initialize

    with _HYDRA, initialize(version_base="1.3", config_path=None, job_name="t2vz"):
        return compose(job.config_name, overrides=list(overrides_))


def one_line(error: BaseException) -> str:
    """An error as the command line prints it: one line, `t2vz: error: ...`. Hydra's composition errors keep
    their first two lines (what failed, and why), without OmegaConf's key/type details."""
    texts = [str(error)] + ([str(error.__cause__)] if error.__cause__ is not None else [])
    lines = [line for text in texts for line in text.splitlines() if line.strip() and not line[0].isspace()]
    return "t2vz: error: " + (" ".join(": ".join(lines[:2]).split()) or type(error).__name__)


def config_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (*USER_ERRORS, HydraException, OmegaConfBaseException)


@dataclass
class Result:
    """One generation: the command line that reproduces it, the seed used, and its run folder and files; or the
    one-line error (then `folder` is None)."""

    command: str
    seed: int
    folder: Optional[Path] = None
    files: list[str] = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    def path(self, suffix: str) -> Optional[str]:
        """The first file of the run ending with `suffix` (".mp4", "_sheet.png", "config.yaml", "trace.png")."""
        name = next((n for n in self.files if n.endswith(suffix)), None)
        return None if name is None else str(self.folder / name)

    def status(self) -> str:
        if self.error:
            return self.error
        return f"t2vz: wrote {', '.join(self.files)} to {self.folder}"


_RUNS = itertools.count()


def new_run_folder(outputs: Path) -> Path:
    """outputs/DATE/TIME-N, like the command line's outputs/DATE/TIME."""
    folder = Path(outputs) / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}-{next(_RUNS)}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def keep_image(image: Any, stem: Path) -> Any:
    """An image input kept in the run folder, so that the command line shown names a file that stays: a file is
    copied as it is (`{stem}{suffix}`); an (H, W, 3) array (gradio's upload) or a PIL image is saved losslessly as
    `{stem}.png`. Returns the kept file's absolute path; a path that names no file is returned as given, for the
    config's check to name. A file that is not a picture is a VideoIOError naming it."""
    from .video_io import load_image, write_image

    if isinstance(image, (str, os.PathLike)):
        source = Path(image)
        if not source.is_file():
            return image
        load_image(source, "image")  # not a picture: named here, as the user gave it, not as its copy
        target = stem.with_suffix(source.suffix)
        shutil.copyfile(source, target)
        return str(target.resolve())
    return str(write_image(stem.with_suffix(".png"), load_image(image, "image")).resolve())


def run_job(job: Job, values: dict[str, Any], outputs: str | os.PathLike) -> Result:
    """Generate what the widget `values` ask for, as `job`'s command line does, into a new folder under `outputs`:
    seed -1 is replaced by a random seed; a video or image input is copied (an uploaded picture saved as PNG) into
    the run folder first (the command line shown then names a file that stays). With `trace` (text-to-video's "Show
    how it was made") the generation is traced and trace.png and trace/ are written beside the video, as
    `python -m t2vz trace=true` writes them; the frames are the same either way. A bad value returns the command
    line's one-line error."""
    values = dict(values)
    seed = normalized(values.get("seed", 0), 0, numeric=True)
    if seed == -1:
        seed = random.SystemRandom().randint(0, SEED_MAX)
    values["seed"] = seed
    folder = new_run_folder(Path(outputs))
    for f in job.fields():
        if f.kind == "video" and values.get(f.key):
            source = Path(values[f.key])
            target = folder / f"{f.key.split('.')[0]}{source.suffix}"
            (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
            values[f.key] = str(target.resolve())
        if f.kind == "image" and values.get(f.key) is not None:
            try:
                values[f.key] = keep_image(values[f.key], folder / f.key.split(".")[-1])
            except config_errors() as e:
                shutil.rmtree(folder, ignore_errors=True)
                return Result("", seed if isinstance(seed, int) else 0, error=one_line(e))
    args = overrides(job, values)
    result = Result(command_line(job, args), seed if isinstance(seed, int) else 0)
    start = time.perf_counter()
    try:
        cfg = compose_config(job, args)
        check_model_folders(cfg)  # the model first: values such as method.t1 are checked against it
        config = job.task.to_config(cfg)
        job.task.load(config)
        trace = config_trace(config)  # text-to-video's "Show how it was made", as `python -m t2vz trace=true`
        frames, _ = job.task.generate(config) if trace is None else job.task.generate(config, trace=trace)
        result.files = write_run(folder, frames, config, OmegaConf.to_yaml(cfg, resolve=True), start)
        if trace is not None:
            result.files += write_trace(folder, trace)
        result.folder = folder
    except config_errors() as e:
        result.error = one_line(e)
        shutil.rmtree(folder, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------ models and videos
def model_kind(folder: Path) -> Optional[str]:
    """"controlnet", "instruct" (an 8-channel InstructPix2Pix UNet) or "model" for a t2vz folder; None otherwise."""
    if not (folder / CONFIG_FILE).is_file():
        return None
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        fmt = meta.get("format")
        read_meta(folder, fmt if fmt in (FORMAT, CONTROLNET_FORMAT) else FORMAT)
    except (ModelFolderError, ValueError, AttributeError):
        return None
    if fmt == CONTROLNET_FORMAT:
        return "controlnet"
    return "instruct" if meta["unet"].get("in_channels") == 8 else "model"


def scan_models(models: Optional[str | os.PathLike]) -> dict[str, list[str]]:
    """The converted folders directly under `models`, by kind (`model_kind`), sorted; the toy model first among
    the text-to-image models."""
    found: dict[str, list[str]] = {"model": [TOY_MODEL], "controlnet": [], "instruct": []}
    if models and Path(models).is_dir():
        for folder in sorted(p for p in Path(models).iterdir() if p.is_dir()):
            kind = model_kind(folder)
            if kind:
                found[kind].append(str(folder))
    return found


def scan_videos(folders: list[Path]) -> list[str]:
    """Video files under `folders` (the app's outputs included), newest first: what a control or source video can
    be picked from."""
    videos = [p for folder in folders if folder.is_dir() for p in folder.rglob("*")
              if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file() and not p.name.startswith(".")]
    return [str(p) for p in sorted(videos, key=lambda p: p.stat().st_mtime, reverse=True)]


def is_toy(model: str) -> bool:
    try:
        meta = json.loads((resolve_model_path(model) / CONFIG_FILE).read_text())
    except (OSError, ValueError, ModelFolderError):
        return False
    return meta.get("variant") == "toyworld"


def start_value(f: Field, default: Any, model: Optional[str]) -> Any:
    """A widget's starting value: the config's default, except "Show how it was made" (`trace`), which starts on
    for the toy model (tracing it costs about a second, docs/app.md) and off for other models."""
    return is_toy(model) if f is TRACE and model else default


def examples_for(job: Job, model: Optional[str]) -> tuple[str, ...]:
    if job is INSTRUCT_JOB:
        return INSTRUCT_EXAMPLES
    if job is CONTROL_JOB:
        return CONTROL_EXAMPLES
    return TOY_EXAMPLES if model and is_toy(model) else SD_EXAMPLES


def model_defaults_text(model: Optional[str]) -> str:
    """The model's own λ, t0, t1 (at 50 steps), for the empty method fields' help line."""
    if not model:
        return ""
    own = model_method_defaults(model)
    return (f"empty: the model's own; {Path(str(model)).name}: λ={own['motion_strength']:g}, t0={own['t0']}, "
            f"t1={own['t1']} at 50 steps (moved with the steps)")


# --------------------------------------------------------------------------------------------------- the page
def build_app(models: Optional[str] = None, outputs: str = "outputs/app", videos: Optional[str] = None):
    """The gradio Blocks of the app: a tab per job; generations queued one at a time."""
    import gradio as gr

    found = scan_models(models)
    video_folders = [Path(outputs)] + ([Path(videos)] if videos else [])
    with gr.Blocks(title="t2vz: Text2Video-Zero") as demo:
        gr.Markdown("# t2vz: Text2Video-Zero\nZero-shot video generation with a text-to-image model "
                    "(Khachatryan et al., ICCV 2023). Every result shows the command line that reproduces it.")
        with gr.Tabs():
            for job in JOBS:
                with gr.Tab(job.name, id=job.config_name):
                    job_tab(gr, job, found, video_folders, outputs)
    return demo


def job_tab(gr, job: Job, found: dict[str, list[str]], video_folders: list[Path], outputs: str) -> None:
    """One tab: the job's fields (main ones, then an 'Advanced options' accordion), Generate, and the outputs."""
    defaults = defaults_of(job)
    prefix = job.config_name
    inputs: list[tuple[Field, list]] = []
    with gr.Row():
        with gr.Column():
            for f in job.main:
                inputs.append((f, widget(gr, f, start_value(f, defaults[f.key], TOY_MODEL), found, video_folders,
                                         prefix)))
            example = gr.Dropdown(list(examples_for(job, TOY_MODEL)), value=None, label="example prompts",
                                  elem_id=f"{prefix}-examples")
            button = gr.Button("Generate", variant="primary", elem_id=f"{prefix}-generate")
            with gr.Accordion("Advanced options", open=False):
                for row in range(0, len(job.advanced), 3):
                    with gr.Row():
                        for f in job.advanced[row:row + 3]:
                            inputs.append((f, widget(gr, f, defaults[f.key], found, video_folders, prefix)))
        with gr.Column():
            status = gr.Textbox(label="status", interactive=False, elem_id=f"{prefix}-status", lines=2)
            video = gr.Video(label="video", interactive=False, elem_id=f"{prefix}-output", autoplay=True, loop=True,
                             height=360)
            sheet = gr.Image(label="contact sheet", interactive=False, type="filepath", elem_id=f"{prefix}-sheet",
                             height=240)
            how = []  # text-to-video: the trace sheet, collapsed below the video, shown after a traced generation
            if TRACE in job.fields():
                with gr.Accordion("How it was made", open=False, visible=False,
                                  elem_id=f"{prefix}-trace-section") as section:
                    gr.Markdown("Each step of Algorithm 1 in this generation, decoded with the VAE and labelled with "
                                "the paper's symbols (docs/method.md): frame 1's noise and trajectory, the warped "
                                "frames, the frames at T₁, every frame's predicted x̂₀ in the video pass, where a "
                                "point attends under cross-frame attention. The run folder's trace/ holds each "
                                "image and the tensors.")
                    trace_sheet = gr.Image(label="trace.png", interactive=False, type="filepath",
                                           elem_id=f"{prefix}-trace-sheet", buttons=["download", "fullscreen"])
                how = [section, trace_sheet]
            seed_used = gr.Textbox(label="seed used", interactive=False, elem_id=f"{prefix}-seed-used")
            command = gr.Textbox(label="the same run from the shell", interactive=False, elem_id=f"{prefix}-command",
                                 buttons=["copy"])
            files = gr.File(label="downloads", file_count="multiple", interactive=False, elem_id=f"{prefix}-files")

    components = [c for _, cs in inputs for c in cs]
    prompt = next(cs[0] for f, cs in inputs if f.kind == "prompt")
    example.select(lambda choice: choice, inputs=example, outputs=prompt)
    model = next(cs[0] for f, cs in inputs if f.kind == "model")
    model_fields = {f.key: cs[0] for f, cs in inputs if f.key in ("method.motion_strength", "method.t0", "method.t1")}
    traced = [cs[0] for f, cs in inputs if f is TRACE]  # "Show how it was made": on for the toy model
    if model_fields:
        def on_model(choice):
            text = model_defaults_text(choice)
            return [gr.Dropdown(choices=list(examples_for(job, choice)), value=None),
                    *(gr.Textbox(info=text) for _ in model_fields),
                    *(gr.Checkbox(value=start_value(TRACE, False, choice)) for _ in traced)]
        model.change(on_model, inputs=model, outputs=[example, *model_fields.values(), *traced])

    def generate(data: dict, progress=gr.Progress(track_tqdm=True)):  # tqdm's DDIM bars drive the page's bar
        values = {}
        for f, cs in inputs:
            got = [data[c] for c in cs]
            values[f.key] = got if f.kind == "pair" else (got[0] or got[1]) if f.kind == "video" else got[0]
        result = run_job(job, values, outputs)
        paths = [result.path(s) for s in (".mp4", "_sheet.png", "config.yaml", "trace.png")]
        shown = (gr.Accordion(visible=paths[3] is not None), paths[3]) if how else ()
        return (result.status(), paths[0], paths[1], "" if result.error else str(result.seed), result.command,
                [p for p in paths if p] or None, *shown)

    button.click(generate, inputs=set(components), outputs=[status, video, sheet, seed_used, command, files, *how],
                 concurrency_limit=1, concurrency_id="generate")


def widget(gr, f: Field, default: Any, found: dict[str, list[str]], video_folders: list[Path], prefix: str) -> list:
    """The gradio component(s) of one field, starting at the config's default."""
    elem_id = f"{prefix}-{f.key.replace('.', '-')}"
    info = f.info or None
    if f.kind == "prompt":
        return [gr.Textbox(label=f.label, value=default, lines=2, elem_id=elem_id, placeholder=(
            "a red circle on grass" if f.key == "prompt" else "make it winter"))]
    if f.kind in ("model", "controlnet"):
        instruct = prefix == INSTRUCT_JOB.config_name
        choices = found["controlnet"] if f.kind == "controlnet" else found["instruct" if instruct else "model"]
        if not choices:
            what, source = ("ControlNet", "CONTROLNET_FILE") if f.kind == "controlnet" else ("InstructPix2Pix",
                                                                                           "IP2P_CKPT")
            info = (f"no {what} folder found: convert one with python -m weights_convert {source} MODELS/NAME and "
                    "start the app with --models MODELS")
        elif f.kind == "model" and not instruct:
            info = "toyworld ships with t2vz; the converted folders under --models are listed too"
        return [gr.Dropdown(choices, value=choices[0] if choices else None, label=f.label, elem_id=elem_id,
                            info=info, allow_custom_value=True)]
    if f.kind == "video":
        pick = gr.Dropdown(scan_videos(video_folders), value=None, label=f"{f.label}: or pick one", info=info,
                           elem_id=f"{elem_id}-pick", allow_custom_value=True)
        pick.focus(lambda: gr.Dropdown(choices=scan_videos(video_folders)), outputs=pick)  # new outputs listed
        return [gr.Video(label=f"{f.label}: upload", sources=["upload"], elem_id=elem_id), pick]
    if f.kind == "image":  # an array: run_job saves it as a PNG in the run folder, which the command line names
        return [gr.Image(label=f.label, type="numpy", image_mode="RGB", sources=["upload", "clipboard"],
                         placeholder=info, elem_id=elem_id, height=200)]
    if f.kind == "pair":
        with gr.Row():
            return [gr.Number(value=v, label=f"{f.label} {name}", elem_id=f"{elem_id}-{i}", info=info if i else None)
                    for i, (name, v) in enumerate(zip(("δx", "δy"), default))]
    if f.kind == "choice":
        return [gr.Dropdown(list(f.choices), value=default, label=f.label, info=info, elem_id=elem_id)]
    if f.kind == "bool":
        return [gr.Checkbox(value=default, label=f.label, info=info, elem_id=elem_id)]
    if f.kind == "slider":
        low, high, step = f.bounds
        return [gr.Slider(low, high, value=default, step=step, label=f.label, info=info, elem_id=elem_id)]
    if f.kind == "text":
        return [gr.Textbox(value=default, label=f.label, info=info, elem_id=elem_id)]
    if f.kind == "list":
        return [gr.Textbox(value=", ".join(default), label=f.label, info=info, elem_id=elem_id, placeholder="none")]
    if default is None:  # a number that may be null: a text field, empty meaning null (a gr.Number sends 0)
        if f.key in ("method.motion_strength", "method.t0", "method.t1"):
            info = model_defaults_text(TOY_MODEL)
        return [gr.Textbox(value="", label=f.label, info=info, elem_id=elem_id, placeholder="empty: null")]
    return [gr.Number(value=default, label=f.label, info=info, elem_id=elem_id,
                      precision=0 if f.kind == "int" else None)]


# ---------------------------------------------------------------------------------------------- command line
SHARE_WARNING = ("t2vz-app: --share opens a public gradio.live link: anyone with it can run generations on this "
                 "machine and download what it writes; share it only with people you trust")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="t2vz-app", description=(
        "Text2Video-Zero in the browser: text-to-video, ControlVideo and Video Instruct-Pix2Pix on the toy model "
        "that ships with t2vz or converted model folders. Binds 127.0.0.1 (this machine only) unless --host says "
        "otherwise."))
    parser.add_argument("--models", default="models", help="folder of converted model, ControlNet and "
                        "InstructPix2Pix folders (python -m weights_convert SRC MODELS/NAME); default: models")
    parser.add_argument("--outputs", default="outputs/app", help="where each generation's run folder goes; "
                        "default: outputs/app")
    parser.add_argument("--videos", default=None, help="a folder of videos to pick control/source videos from "
                        "(the app's own outputs are always listed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the app to the "
                        "network (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link "
                        "(docs/app.md: what that exposes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app works offline
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("t2vz-app: error: gradio is not installed; install the app extra: pip install -e '.[app]' "
              "(or T2VZ_EXTRAS=app bash experiments/setup.sh)", file=sys.stderr)
        return 2
    if args.share:
        print(SHARE_WARNING, file=sys.stderr)
    Path(args.outputs).mkdir(parents=True, exist_ok=True)
    demo = build_app(args.models, args.outputs, args.videos)
    allowed = [str(Path(args.outputs).resolve())] + ([str(Path(args.videos).resolve())] if args.videos else [])
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share, allowed_paths=allowed, ssr_mode=False,
        footer_links=[], mcp_server=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
