"""Judge the toy model honestly: held-out prompts and seeds, scored by the renderer that made its training data.

    .venv/bin/python experiments/judge_toyworld.py                  # docs/toy_model.md's numbers (model=toyworld)
    .venv/bin/python experiments/judge_toyworld.py model=models/toy-quick images_per_prompt=4
    .venv/bin/python experiments/judge_toyworld.py images_per_prompt=0 t0=25 t1=25   # motion only, warp at step 25
    .venv/bin/python experiments/judge_toyworld.py images_per_prompt=0 cross_frame=off  # without Sec. 3.3's attention
    .venv/bin/python experiments/judge_toyworld.py images_per_prompt=0 merging_ratio=0.5 cache_interval=3  # fast modes

1. Text faithfulness: for every held-out (colour, shape, background) combination of `world.HELD_OUT` (never in
   the training data) and as many combinations that were in it, `images_per_prompt` images from seeds the
   training never used (`text_to_image`); the fraction whose asked colour, and asked colour and shape, the judge
   sees (`judge.judge_image`). Chance: 1/5 for the colour, 1/20 for both.
2. Motion: 8-frame videos at λ = `motion_strengths` in each of `directions`; the translation between consecutive
   frames measured by phase correlation against the requested one, −λ·δ·64/512 pixels a frame
   (`judge.requested_motion`): the mean per-frame error, per axis, and how many videos and how many frame pairs
   are within 1 px; judge.json also has each video's error per frame pair, and their mean per pair and setting.
   The last column measures against the motion the warp applies (`judge.applied_motion`): nearest sampling moves
   the content in whole latent pixels (4 image pixels), so where λ·δ·16/512 is not a whole number (the paper's
   λ = 12: 0.375) the frames jump by 0 or 4 px and no video can be within 1 px of the requested motion.
   `cross_frame` is the pipeline's (`first`, the method; `off`, its ablation); `cross_frame_levels=[1]` keeps
   it to one UNet level (8×8 on the toy model, whose 16×16 level has no attention), an ablation of where it acts.
   `merging_ratio`, `merging_max_downsample`, `cache_interval` and `cache_branch` are the videos' fast modes
   (token merging, feature caching; docs/method.md); their defaults are the exact path.
3. Appearance consistency of the object across frames (`judge.appearance_consistency`), in the same videos: its
   IoU with frame 1's, how often it keeps frame 1's shape and its tone (`world.TONES`, which no caption names).

Writes `judge.json` and `judge.md` into Hydra's output folder and prints the tables.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tqdm.auto import tqdm

import t2vz
from t2vz.sd.attention import CROSS_FRAME_MODES, check_cross_frame_levels
from t2vz.toyworld.judge import (applied_motion, judge_image, judge_video, motion_errors, motion_scores,
                                 requested_motion)
from t2vz.toyworld.world import BACKGROUNDS, HELD_OUT, OBJECT_COLOURS, SHAPES, caption, is_held_out
from t2vz.video_io import contact_sheet, write_image, write_text

SEED_OFFSET = 10_000  # generation seeds start here; the training scenes are drawn from other streams entirely


@dataclass
class JudgeConfig:
    model: str = "toyworld"
    images_per_prompt: int = 8
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    t0: Optional[int] = None  # None: the model's own (toyworld 8, 8; the paper's 44, 47 for SD 1.5 folders)
    t1: Optional[int] = None
    video_seeds: int = 2  # videos per (prompt, λ, δ)
    num_frames: int = 8
    motion_strengths: list[float] = field(default_factory=lambda: [32.0, 64.0])
    directions: list[list[float]] = field(default_factory=lambda: [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    video_prompts: int = 4  # the first N prompts of each set (held-out and seen) also make videos
    cross_frame: str = "first"  # the videos' cross-frame attention: "first" (the method) or "off" (its ablation)
    cross_frame_levels: Optional[list[int]] = None  # only these UNet levels mix frames (an ablation); None: all
    # the videos' fast modes (config.FastConfig; the defaults are the exact path): token merging, feature caching
    merging_ratio: float = 0.0
    merging_max_downsample: int = 2  # the toy UNet's attention starts one level down (8×8 tokens)
    cache_interval: int = 1
    cache_branch: int = 0


ConfigStore.instance().store(name="judge_toyworld", node=JudgeConfig)


def seen_prompts(n: int) -> list[tuple[str, str, str]]:
    """n (colour, shape, background) combinations that were in the training data, spread over all three."""
    combos = [(c, s, b) for b in BACKGROUNDS for c in OBJECT_COLOURS for s in SHAPES if not is_held_out(c, s, b)]
    rng = np.random.default_rng(0)
    return [combos[i] for i in rng.choice(len(combos), size=n, replace=False)]


def rate(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


@hydra.main(version_base="1.3", config_path=None, config_name="judge_toyworld")
def main(cfg) -> None:
    cfg: JudgeConfig = OmegaConf.to_object(cfg)
    if cfg.cross_frame not in CROSS_FRAME_MODES:  # before the text-faithfulness part, not after it
        raise SystemExit(f"cross_frame={cfg.cross_frame!r} is not one of {', '.join(CROSS_FRAME_MODES)}")
    out = HydraConfig.get().runtime.output_dir
    pipe = t2vz.TextToVideoZero.from_pretrained(cfg.model)
    try:
        check_cross_frame_levels(cfg.cross_frame_levels, cfg.cross_frame, pipe.sd.unet.config.attention_levels)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    own = pipe.sd.method_defaults
    cfg.t0, cfg.t1 = (own["t0"] if cfg.t0 is None else cfg.t0), (own["t1"] if cfg.t1 is None else cfg.t1)  # recorded
    sets = {"held-out": list(HELD_OUT), "seen": seen_prompts(len(HELD_OUT))}

    # 1. text faithfulness
    faith, samples = {}, []
    for name, combos in sets.items():
        rows = []
        for k, (c, s, b) in enumerate(tqdm(combos, desc=f"images ({name} prompts)")):
            text = caption(b, [(c, s)])
            for j in range(cfg.images_per_prompt):
                gen = torch.Generator().manual_seed(SEED_OFFSET + 100 * k + j)
                image = t2vz.text_to_image(pipe.sd, text, num_inference_steps=cfg.num_inference_steps,
                                           guidance_scale=cfg.guidance_scale, generator=gen, progress=False)
                v = judge_image(image, text)
                rows.append({"prompt": text, "seed": SEED_OFFSET + 100 * k + j, "colour_ok": bool(v["colour_ok"]),
                             "shape_ok": bool(v["shape_ok"]), "seen_shape": v["shape"]})
                if j == 0:
                    samples.append(image)
        faith[name] = {"images": len(rows), "colour": rate([r["colour_ok"] for r in rows]),
                       "colour_and_shape": rate([r["shape_ok"] for r in rows]), "per_image": rows}
    if samples:  # images_per_prompt=0 measures motion only
        write_image(f"{out}/samples.png", contact_sheet(torch.stack(samples), columns=len(HELD_OUT)))

    # 2–3. motion and appearance consistency
    motion = []
    factor = pipe.sd.vae.downsample_factor  # image pixels per latent pixel
    video_combos = sets["held-out"][:cfg.video_prompts] + sets["seen"][:cfg.video_prompts]
    bar = tqdm(total=len(video_combos) * len(cfg.motion_strengths) * len(cfg.directions) * cfg.video_seeds,
               desc="videos")
    for k, (c, s, b) in enumerate(video_combos):
        text = caption(b, [(c, s)])
        for lam in cfg.motion_strengths:
            for direction in cfg.directions:
                for j in range(cfg.video_seeds):
                    gen = torch.Generator().manual_seed(SEED_OFFSET + 100 * k + j)
                    frames = pipe(text, num_frames=cfg.num_frames, motion_strength=lam, direction=direction,
                                  t0=cfg.t0, t1=cfg.t1, cross_frame=cfg.cross_frame,
                                  cross_frame_levels=cfg.cross_frame_levels, merging_ratio=cfg.merging_ratio,
                                  merging_max_downsample=cfg.merging_max_downsample,
                                  cache_interval=cfg.cache_interval, cache_branch=cfg.cache_branch,
                                  num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                  generator=gen, progress=False)
                    size = frames.shape[1:3]
                    requested = requested_motion(lam, direction, *size)
                    errors = motion_errors(frames, requested)  # (f − 1, 2), measured once for every use
                    applied = applied_motion(lam, direction, len(frames), [n // factor for n in size], size)
                    m = {**judge_video(frames, text), **motion_scores(errors)}
                    # measured − applied = (measured − requested) − (applied − requested): no second measurement
                    off_applied = errors - (applied - torch.tensor(requested, dtype=torch.float64))
                    m["motion_error_applied"] = off_applied.norm(dim=1).mean().item()
                    motion.append({"prompt": text, "lambda": lam, "direction": direction, "seed": j,
                                   "requested_dy": requested[0], "requested_dx": requested[1], **m,
                                   "motion_error_per_pair": errors.norm(dim=1).tolist()})  # frame k → k + 1, px
                    bar.update(1)
    bar.close()

    def summary(rows):
        err = np.array([[r["motion_error_y"], r["motion_error_x"]] for r in rows])
        return {"videos": len(rows), "motion_error_px": rate([r["motion_error"] for r in rows]),
                "motion_error_applied_px": rate([r["motion_error_applied"] for r in rows]),
                "motion_error_y_px": float(err[:, 0].mean()), "motion_error_x_px": float(err[:, 1].mean()),
                "videos_within_1px": rate([r["motion_error"] <= 1.0 for r in rows]),
                "frame_pairs_within_1px": rate([r["motion_pairs_within_1px"] for r in rows]),
                "motion_error_by_pair_px": np.mean([r["motion_error_per_pair"] for r in rows], axis=0).tolist(),
                "object_iou": float(np.nanmean([r["object_iou"] for r in rows])),
                "object_same_shape": float(np.nanmean([r["object_same_shape"] for r in rows])),
                "object_same_tone": float(np.nanmean([r["object_same_tone"] for r in rows])),
                "text_shape_ok_frames": rate([r["text_shape_ok"] for r in rows])}

    by_setting = {f"λ={lam:g} δ=({d[0]:g},{d[1]:g})": summary(
        [r for r in motion if r["lambda"] == lam and r["direction"] == d])
        for lam in cfg.motion_strengths for d in cfg.directions}
    result = {"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "text_faithfulness": faith,
              "motion": {"all": summary(motion), "by_setting": by_setting, "per_video": motion}}

    lines = []
    if cfg.images_per_prompt:  # 0: motion only
        lines = ["| prompts | images | colour right | colour and shape right |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {f['images']} | {f['colour']:.1%} | {f['colour_and_shape']:.1%} |"
                  for name, f in faith.items()]
        lines.append("")
    lines += ["| motion (per frame, requested −λ·δ·64/512 px) | videos | mean error px | error y px | "
              "error x px | videos within 1 px | frame pairs within 1 px | object IoU | same shape | same tone | "
              "mean error against the applied warp px |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in {**by_setting, "all": summary(motion)}.items():
        lines.append(f"| {name} | {m['videos']} | {m['motion_error_px']:.2f} | {m['motion_error_y_px']:.2f} | "
                     f"{m['motion_error_x_px']:.2f} | {m['videos_within_1px']:.0%} | "
                     f"{m['frame_pairs_within_1px']:.0%} | {m['object_iou']:.3f} | "
                     f"{m['object_same_shape']:.3f} | {m['object_same_tone']:.3f} | "
                     f"{m['motion_error_applied_px']:.2f} |")
    table = "\n".join(lines) + "\n"
    write_text(f"{out}/judge.json", json.dumps(result, indent=2) + "\n")
    write_text(f"{out}/judge.md", table)
    print(table)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
