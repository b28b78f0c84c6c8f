"""Image-to-video and video editing on the toy model, judged by the renderer: one job = one toy scene, one method.

    .venv/bin/python experiments/toy_editing.py task=image_to_video seed=0
    .venv/bin/python experiments/toy_editing.py task=edit method=tune_a_video edit=colour seed=0
    .venv/bin/python experiments/toy_editing.py -m +experiment=editing/image_to_video   # 25 videos
    .venv/bin/python experiments/toy_editing.py -m +experiment=editing/ablate_editing   # 3 methods × 3 edits × 5
    .venv/bin/python experiments/report.py multirun/DATE/TIME                          # the tables, per setting

task=image_to_video: a toy scene rendered (`world.render`, its object placed on the right so that the motion,
λ·δ to the left, keeps it in view), then `TextToVideoZero(caption, image=picture)`. Metrics: frame 1 against the
picture (mean |error| on 0…255 and PSNR), the fraction of frames in which the judge sees the picture's object in
its colour and in its shape (`judge.judge_image`), the object's tone kept from frame 1, and the global motion
against the asked one (`judge.motion_errors`, phase correlation); vae_round_trip_error is the picture encoded and
decoded alone, the floor of frame 1's error, and round_trip_shape_ok whether the judge still sees the shape there.

task=edit: a source video of `num_frames` frames, the scene's object moving `velocity` pixels a frame to the
right over the still background (`world.render_video`), captioned; the edit changes the object's colour, its shape
or the background in the caption, and
  method=tune_a_video  tunes the inflated UNet on the source video and its caption (`tune_a_video.py`), DDIM-inverts
                       the video with the tuned model and samples the edit prompt from there (the authors' recipe);
  method=inversion     the same without tuning (the untuned inflated model is the image model with sparse-causal
                       attention);
  method=t2v_zero      Text2Video-Zero's text-to-video of the edit prompt, its global motion at the source's speed
                       (λ = 8·velocity, δ = (−1, 0) on the 64-pixel toy model).
Metrics per video (fractions of frames, by the judge on the edit caption): edit_ok (the asked attribute seen),
colour_ok, shape_ok (colour and shape), background_ok, all_ok; object_motion_error (pixels a frame between the
object's centroid motion and the source's velocity) and object_speed (its mean x motion a frame). Tuned weights are
cached per seed in `cache_dir`, so the three edits of a seed share one tuning (tune_s is the tuning's time where it
ran, NaN where the cache served it).

Each job writes metrics.json (its overrides and metrics, as experiments/run.py's jobs), frames.png (a contact sheet)
and, for edits, source.png.
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import t2vz
from t2vz.experiment.editing_runs import EDITS, edit_caption, judge_edit, release_config_group, source_scene
from t2vz.experiment.metrics import first_frame_error
from t2vz.method.sampling import decode_images
from t2vz.toyworld.judge import judge_image, judge_video, requested_motion
from t2vz.toyworld.world import SIZE, render, render_video
from t2vz.video_io import contact_sheet, write_image, write_text

release_config_group("method")  # `method` is this script's plain key, not t2vz's method config group
TASKS = ("image_to_video", "edit")
METHODS = ("tune_a_video", "inversion", "t2v_zero")


@dataclass
class TuneConfig:
    steps: int = 500
    lr: float = 3e-5


@dataclass
class ToyEditingConfig:
    task: str = "image_to_video"
    method: str = "tune_a_video"  # task=edit only
    edit: str = "colour"          # task=edit only
    seed: int = 0
    model: str = "toyworld"
    num_frames: int = 8
    num_inference_steps: int = 50
    guidance_scale: float = 7.5       # image_to_video and t2v_zero
    edit_guidance_scale: float = 12.5  # tune_a_video and inversion, the authors' default
    motion_strength: float = 32.0     # image_to_video: λ (4 px a frame on the 64-pixel toy model, δ = (1, 0))
    direction: list[float] = field(default_factory=lambda: [1.0, 0.0])
    velocity: float = 4.0             # edit: the source object's speed, pixels a frame to the right
    tune: TuneConfig = field(default_factory=TuneConfig)
    cache_dir: str = "${hydra:runtime.cwd}/outputs/toy_editing_cache"


ConfigStore.instance().store(name="toy_editing", node=ToyEditingConfig)


def image_to_video(cfg: ToyEditingConfig) -> tuple[dict, torch.Tensor, np.ndarray]:
    dy, dx = requested_motion(cfg.motion_strength, cfg.direction, SIZE, SIZE)
    scene = source_scene(cfg.seed, dx * (cfg.num_frames - 1))
    picture = render(scene)
    pipe = t2vz.TextToVideoZero.from_pretrained(cfg.model)
    frames = pipe(scene.caption, image=picture, num_frames=cfg.num_frames, motion_strength=cfg.motion_strength,
                  direction=tuple(cfg.direction), num_inference_steps=cfg.num_inference_steps,
                  guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(cfg.seed))
    picture_01 = torch.from_numpy(picture).float() / 255
    with torch.no_grad():  # the VAE's round trip alone, through the pipeline's own encoding: frame 1's floor
        round_trip = decode_images(pipe.sd, pipe.image_latents(picture, SIZE, SIZE))[0].permute(1, 2, 0).float()
    judged = judge_video(frames, scene.caption, (dy, dx))
    seen = judge_image(picture, scene.caption)
    metrics = {**first_frame_error(frames, picture_01),
               "vae_round_trip_error": first_frame_error(round_trip[None], picture_01)["first_frame_error"],
               "picture_colour_ok": float(seen["colour_ok"]), "picture_shape_ok": float(seen["shape_ok"]),
               "round_trip_shape_ok": float(judge_image(round_trip, scene.caption)["shape_ok"]),
               **{k: judged[k] for k in ("text_colour_ok", "text_shape_ok", "object_same_tone", "object_iou",
                                          "motion_error", "motion_pairs_within_1px")}}
    return metrics, frames, picture


def edit(cfg: ToyEditingConfig) -> tuple[dict, torch.Tensor, np.ndarray]:
    travel = cfg.velocity * (cfg.num_frames - 1)
    scene = source_scene(cfg.seed, travel)
    source = render_video(scene, cfg.num_frames, (cfg.velocity, 0.0))
    thing = scene.things[0]
    target = edit_caption(thing.colour, thing.shape, scene.background, cfg.edit)
    generator = torch.Generator().manual_seed(cfg.seed)
    metrics = {"tune_s": float("nan"), "peak_rss_mib": float("nan")}
    if cfg.method == "t2v_zero":
        pipe = t2vz.TextToVideoZero.from_pretrained(cfg.model)
        frames = pipe(target, num_frames=cfg.num_frames, motion_strength=8.0 * cfg.velocity, direction=(-1.0, 0.0),
                      num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                      generator=generator)
    else:
        from t2vz.method import tune_a_video as tav

        frames, metrics = tav_edit(cfg, tav, scene, source, target, generator)
    return {**metrics, **judge_edit(frames, target, cfg.edit, cfg.velocity)}, frames, source


def tav_edit(cfg: ToyEditingConfig, tav, scene, source: np.ndarray, target: str, generator: torch.Generator):
    """Tune-A-Video (method=tune_a_video: tuned on the source video and its caption, the tuned weights cached per
    seed) or inversion alone (method=inversion: the untuned inflated model), then the edit: (frames, metrics)."""
    metrics = {"tune_s": float("nan"), "peak_rss_mib": float("nan"), "loss_first10": float("nan"),
               "loss_last10": float("nan")}
    if cfg.method == "inversion":
        pipe = tav.TuneAVideo.from_pretrained(cfg.model)
    else:
        cache = Path(cfg.cache_dir) / (f"{Path(cfg.model).name}-seed{cfg.seed}-f{cfg.num_frames}-v{cfg.velocity:g}"
                                       f"-steps{cfg.tune.steps}-lr{cfg.tune.lr:g}.safetensors")
        if cache.exists():
            pipe = tav.TuneAVideo.from_pretrained(cfg.model, tuned=cache)
        else:
            pipe = tav.TuneAVideo.from_pretrained(cfg.model)
            start = time.perf_counter()
            losses = pipe.tune(source, scene.caption, steps=cfg.tune.steps, lr=cfg.tune.lr,
                               generator=torch.Generator().manual_seed(cfg.seed))
            metrics.update(tune_s=time.perf_counter() - start,  # the process's peak, in MiB (Linux: KiB)
                           peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           loss_first10=float(np.mean(losses[:10])), loss_last10=float(np.mean(losses[-10:])))
            cache.parent.mkdir(parents=True, exist_ok=True)
            pipe.save(cache)
    frames = pipe.edit(source, target, num_inference_steps=cfg.num_inference_steps,
                       guidance_scale=cfg.edit_guidance_scale, generator=generator)
    return frames, metrics


def check(cfg: ToyEditingConfig) -> None:
    for key, value, allowed in (("task", cfg.task, TASKS), ("method", cfg.method, METHODS),
                                ("edit", cfg.edit, EDITS)):
        if value not in allowed:
            raise SystemExit(f"toy_editing: error: {key}={value!r} is not one of {', '.join(allowed)}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="toy_editing")
def main(dict_cfg) -> None:
    cfg: ToyEditingConfig = OmegaConf.to_object(dict_cfg)
    check(cfg)
    out = Path(HydraConfig.get().runtime.output_dir)
    start = time.perf_counter()
    metrics, frames, source = image_to_video(cfg) if cfg.task == "image_to_video" else edit(cfg)
    metrics["seconds"] = time.perf_counter() - start
    write_image(out / "frames.png", contact_sheet(frames))
    write_image(out / "source.png", contact_sheet(source[None] if source.ndim == 3 else source))  # uint8
    record = {"overrides": list(HydraConfig.get().overrides.task), "status": "ok",
              **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}}
    write_text(out / "metrics.json", json.dumps(record, indent=2) + "\n")
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
