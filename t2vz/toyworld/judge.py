"""The renderer as judge: it knows what each colour and shape of the toy world looks like, so it can say whether an
image shows what a caption asked for, and whether an object keeps its appearance across the frames of a video.

    judge_image(image, "a red triangle on grass")  → {"colour_ok": True, "shape_ok": True, "shape": "triangle", …}
    appearance_consistency(frames, "red")          → {"object_iou": 0.93, "object_colour_shift": 4.1, …}

How it sees: every pixel takes the name of the nearest colour of the world's palette (the two tones of each of the
five object colours, `world.TONES`, and every background tone, `world.BACKGROUND_TONES`); a pixel is an object
pixel when that nearest colour is an object tone within `MAX_DISTANCE`, and it is named by that tone's colour. The
asked colour's object is its largest 4-connected region; its tone is the one nearer to the region's mean RGB. Its
shape is the template (`world.shape_mask`, the renderer's own drawing) that overlaps it best when fitted to its area
and centroid.
Images are (h, w, 3), uint8 0…255 or float 0…1; frames (f, h, w, 3).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .world import (BACKGROUND_KIND_TONES, BACKGROUND_TONES, NUM_TONES, OBJECT_COLOURS, SHAPES, TONES, parse_caption,
                    pixel_grid, shape_mask)

# RGB distance beyond which a pixel is no object colour (each object tone is ≥ 85 from every other palette colour)
MAX_DISTANCE = 80.0
MIN_AREA = 20  # pixels; the smallest object the world draws (a radius-6 triangle) covers ~72
COLOUR_NAMES = tuple(OBJECT_COLOURS)
OBJECT_TONES = np.array([rgb for c in COLOUR_NAMES for rgb in TONES[c]], dtype=np.float64)  # (colours·tones, 3)
TONE_COLOUR = np.repeat(np.arange(len(COLOUR_NAMES)), NUM_TONES)  # index into OBJECT_TONES → colour
PALETTE = np.concatenate([OBJECT_TONES, np.array(BACKGROUND_TONES, dtype=np.float64)])  # (p, 3)


def as_uint8(image) -> np.ndarray:
    """(…, h, w, 3) float in [0, 1] (tensor or array) or uint8 → uint8 numpy."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if image.shape[-1] != 3:
        raise ValueError(f"images must be (…, h, w, 3) RGB, got shape {image.shape}")
    return image


def colour_labels(image) -> np.ndarray:
    """(h, w, 3) → (h, w) int: index into COLOUR_NAMES of each pixel's object colour, −1 for anything else."""
    px = as_uint8(image).astype(np.float64)
    dist = np.linalg.norm(px[..., None, :] - PALETTE, axis=-1)  # (h, w, p)
    nearest = dist.argmin(-1)
    is_object = (nearest < len(OBJECT_TONES)) & (dist.min(-1) <= MAX_DISTANCE)
    return np.where(is_object, TONE_COLOUR[np.minimum(nearest, len(OBJECT_TONES) - 1)], -1)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (h, w) mask, as a mask (all False when mask is empty)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        region, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


# Area of each shape of radius r, in units of r², and its centroid's offset below the centre (cy), in units of r.
AREA_PER_R2 = {"circle": np.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
CENTROID_BELOW_CENTRE = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3, "diamond": 0.0}


def shape_scores(region: np.ndarray) -> dict[str, float]:
    """IoU of the region with each shape as the renderer draws it, placed by the region's moments: the radius that
    gives the shape the region's area, the centre that gives it the region's centroid. Moments, unlike a bounding
    box, barely move for a stray pixel on an anti-aliased edge."""
    area = region.sum()
    if area == 0:
        return {s: 0.0 for s in SHAPES}
    ys, xs = np.nonzero(region)
    my, mx = ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres
    x, y = pixel_grid(region.shape[0], width=region.shape[1])
    scores = {}
    for s in SHAPES:
        r = float(np.sqrt(area / AREA_PER_R2[s]))
        template = shape_mask(s, mx, my - CENTROID_BELOW_CENTRE[s] * r, r, x, y)
        scores[s] = float((template & region).sum() / max((template | region).sum(), 1))
    return scores


@dataclass
class Seen:
    """What the judge sees of one colour in one image: its largest region, mean RGB, the colour's tone nearer to
    that mean (`world.TONES`; None with the shape) and best-fitting shape (None below MIN_AREA)."""

    colour: str
    region: np.ndarray  # (h, w) bool
    area: int
    rgb: np.ndarray  # (3,) mean colour of the region
    shape: str | None
    shape_iou: float
    tone: int | None = None


def subject_region(image, prompt: str) -> np.ndarray | None:
    """The subject of a toy-world prompt in `image`: the region (H, W) bool of the prompt's first object's colour
    (`look_for`), where the judge sees a shape there; None for a prompt naming no toy-world object, or where it sees
    none. A generation's trace places its attention point with it (`method.trace.Trace(subject=...)`)."""
    pairs, _ = parse_caption(prompt)
    if not pairs:
        return None
    seen = look_for(image, pairs[0][0])
    return seen.region if seen.shape is not None else None


def look_for(image, colour: str, labels: np.ndarray | None = None) -> Seen:
    """The largest region of `colour` in the image and the shape it best matches (None when below MIN_AREA).
    `labels`: the image's `colour_labels`, when the caller has them already."""
    if colour not in OBJECT_COLOURS:
        raise ValueError(f"unknown colour {colour!r}; one of {', '.join(COLOUR_NAMES)}")
    img = as_uint8(image)
    labels = colour_labels(img) if labels is None else labels
    region = largest_region(labels == COLOUR_NAMES.index(colour))
    area = int(region.sum())
    rgb = img[region].mean(0) if area else np.full(3, np.nan)
    if area < MIN_AREA:
        return Seen(colour, region, area, rgb, None, 0.0)
    scores = shape_scores(region)
    shape = max(scores, key=scores.get)
    tone = int(np.linalg.norm(np.array(TONES[colour], dtype=np.float64) - rgb, axis=1).argmin())
    return Seen(colour, region, area, rgb, shape, scores[shape], tone)


def judge_image(image, text: str) -> dict:
    """Does the image show what the caption asks? Per asked (colour, shape): the colour is right when its largest
    region covers ≥ MIN_AREA pixels (and, for a one-object caption, no other object colour covers more); the shape
    is right when the colour is and the best-fitting template is the asked shape. Returns the first object's
    verdict plus `all_ok` over every object."""
    pairs, _ = parse_caption(text)
    if not pairs:
        raise ValueError(f"caption {text!r} names no toy-world object (a colour of {', '.join(COLOUR_NAMES)} "
                         f"followed by a shape of {', '.join(SHAPES)})")
    labels = colour_labels(image)
    verdicts = []
    for colour, shape in pairs:
        seen = look_for(image, colour, labels)
        colour_ok = seen.shape is not None
        if colour_ok and len(pairs) == 1:
            others = [largest_region(labels == i).sum() for i, c in enumerate(COLOUR_NAMES) if c != colour]
            colour_ok = seen.area >= max(others, default=0)
        verdicts.append({"colour": colour, "asked_shape": shape, "colour_ok": colour_ok,
                         "shape_ok": colour_ok and seen.shape == shape, "shape": seen.shape, "area": seen.area})
    first = verdicts[0]
    return {**first, "all_ok": all(v["colour_ok"] and v["shape_ok"] for v in verdicts), "objects": verdicts}


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """mask translated by (dy, dx) pixels, zero-filled."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
    return out


def appearance_consistency(frames, colour: str) -> dict[str, float]:
    """How well the `colour` object keeps its appearance from frame 1 to every later frame (f, h, w, 3):

    - object_iou: IoU of its region with frame 1's after aligning their centroids (position may change, shape
      and size may not); 0 for a frame where it is gone,
    - object_colour_shift: RGB distance (0…255 scale) of its mean colour from frame 1's,
    - object_same_shape: fraction of frames whose best-fitting shape equals frame 1's,
    - object_same_tone: fraction of frames that draw the object in frame 1's tone (`world.TONES`, which the
      caption leaves to the noise),
    Averaged over frames 2…f (a frame where the object is gone counts as a different shape and tone); NaN when
    frame 1 shows no such object."""
    frames = as_uint8(frames)
    seen = [look_for(f, colour) for f in frames]
    nan = {k: float("nan") for k in ("object_iou", "object_colour_shift", "object_same_shape", "object_same_tone")}
    if seen[0].shape is None or len(frames) < 2:
        return nan
    ref = seen[0]
    ref_centre = np.argwhere(ref.region).mean(0)
    ious, shifts, same, same_tone = [], [], [], []
    for s in seen[1:]:
        same_tone.append(float(s.tone == ref.tone))  # False where the object is gone (tone None)
        if s.shape is None:
            ious.append(0.0)
            same.append(0.0)
            continue
        dy, dx = np.rint(ref_centre - np.argwhere(s.region).mean(0)).astype(int)
        aligned = _shift(s.region, int(dy), int(dx))
        ious.append(float((aligned & ref.region).sum() / max((aligned | ref.region).sum(), 1)))
        shifts.append(float(np.linalg.norm(s.rgb - ref.rgb)))
        same.append(float(s.shape == ref.shape))
    return {"object_iou": float(np.mean(ious)),
            "object_colour_shift": float(np.mean(shifts)) if shifts else float("nan"),
            "object_same_shape": float(np.mean(same)), "object_same_tone": float(np.mean(same_tone))}


def requested_motion(motion_strength: float, direction, height: int, width: int) -> tuple[float, float]:
    """The per-frame global translation (dy, dx) in image pixels that λ and δ ask for: the latent warp samples
    frame k at p + λ·k·δ on a 512-pixel grid stretched over the frame (`t2vz.method.motion`), so the content moves by
    −λ·δ·(size/512) pixels a frame (the sign convention of `metrics.global_translation`: right/down positive)."""
    dx, dy = (float(d) for d in direction)
    return -motion_strength * dy * height / 512, -motion_strength * dx * width / 512


def applied_motion(motion_strength: float, direction, num_frames: int, latent_size, image_size) -> torch.Tensor:
    """(num_frames − 1, 2) float64: the translation (dy, dx) in image pixels from each frame to the next that the
    method's warp applies (`motion.applied_shifts`, whole latent pixels, scaled to image pixels; content moves by
    minus the sampling shift). It equals `requested_motion` where λ·δ·w/512 is a whole number of latent pixels
    (λ = 32 and 64 on the toy model's 16×16 latents); at the paper's λ = 12 (0.375 of a latent pixel a frame) the
    content moves by 0 or 4 image pixels from frame to frame."""
    from ..method.motion import applied_shifts, translation_path

    shifts = applied_shifts(translation_path(range(num_frames), motion_strength, direction), latent_size)
    scale = torch.tensor([image_size[0] / latent_size[0], image_size[1] / latent_size[1]], dtype=torch.float64)
    return -(shifts[1:] - shifts[:-1]) * scale


def motion_errors(frames, requested) -> torch.Tensor:
    """(f, h, w, 3) frames (uint8 or float in [0, 1]) → (f − 1, 2) float64: the translation between consecutive
    frames measured by phase correlation (`metrics.measured_motion`) minus `requested`: one (dy, dx) for every
    frame pair (`requested_motion`) or one per pair, (f − 1, 2) (`applied_motion`)."""
    from ..experiment.metrics import measured_motion

    motion = measured_motion(torch.from_numpy(as_uint8(frames)).float() / 255.0).double()
    return motion - torch.as_tensor(requested, dtype=torch.float64)


def motion_scores(errors: torch.Tensor) -> dict[str, float]:
    """`motion_errors` (f − 1, 2) → judge_video's motion metrics (see there)."""
    distance = errors.norm(dim=1)
    return {"motion_error": distance.mean().item(), "motion_error_y": errors[:, 0].abs().mean().item(),
            "motion_error_x": errors[:, 1].abs().mean().item(),
            "motion_pairs_within_1px": (distance <= 1.0).double().mean().item()}


def judge_video(frames, text: str, requested: tuple[float, float] | None = None) -> dict[str, float]:
    """The toy world's video metrics for frames (f, h, w, 3) and their caption:

    - text_colour_ok, text_shape_ok: fraction of frames showing the first asked object in the asked colour, and
      also in the asked shape (`judge_image`); text_all_ok: every asked object right, fraction of frames,
    - object_iou, object_colour_shift, object_same_shape, object_same_tone: `appearance_consistency` of that
      object,
    - with `requested` (dy, dx) per frame: motion_error, the mean over consecutive frame pairs of the distance
      (pixels) between the translation measured by phase correlation and the requested one; motion_error_x/_y
      per axis (mean |difference|); motion_pairs_within_1px, the fraction of frame pairs whose distance is ≤ 1 px
      (the mean hides whether a video is a little off everywhere or far off in one pair).
    """
    frames_u8 = as_uint8(frames)
    verdicts = [judge_image(f, text) for f in frames_u8]
    colour = verdicts[0]["colour"]
    out = {"text_colour_ok": float(np.mean([v["colour_ok"] for v in verdicts])),
           "text_shape_ok": float(np.mean([v["shape_ok"] for v in verdicts])),
           "text_all_ok": float(np.mean([v["all_ok"] for v in verdicts])),
           **appearance_consistency(frames_u8, colour)}
    if requested is not None and len(frames_u8) > 1:
        out.update(motion_scores(motion_errors(frames_u8, requested)))
    return out


def background_kind(image) -> str | None:
    """The background kind ("grass", "sand", "snow", "wall", "floor") whose own tones (`world.BACKGROUND_KIND_TONES`)
    are nearest to the most pixels (within MAX_DISTANCE) of the image (h, w, 3); None when no pixel is."""
    px = as_uint8(image).astype(np.float64).reshape(-1, 3)
    kinds = list(BACKGROUND_KIND_TONES)
    tones = np.array([t for k in kinds for t in BACKGROUND_KIND_TONES[k]], dtype=np.float64)
    owner = np.array([i for i, k in enumerate(kinds) for _ in BACKGROUND_KIND_TONES[k]])
    dist = np.linalg.norm(px[:, None, :] - np.concatenate([tones, PALETTE]), axis=-1)
    nearest = dist.argmin(-1)
    own = nearest < len(tones)  # nearer to a kind's own tone than to any other palette colour
    counts = np.bincount(owner[nearest[own & (dist.min(-1) <= MAX_DISTANCE)]], minlength=len(kinds))
    return kinds[int(counts.argmax())] if counts.sum() else None


def object_track(frames, colour: str) -> np.ndarray:
    """The centroid (y, x) in pixels of the `colour` object in each frame (f, h, w, 3) → (f, 2) float64, NaN in a
    frame where the judge sees no such object (`look_for`)."""
    centres = []
    for frame in as_uint8(frames):
        seen = look_for(frame, colour)
        centres.append(np.argwhere(seen.region).mean(0) if seen.shape is not None else np.full(2, np.nan))
    return np.array(centres, dtype=np.float64)


def object_motion_error(frames, colour: str, velocity: tuple[float, float]) -> float:
    """How far the `colour` object's motion is from `velocity` = (vx, vy) pixels a frame: the mean over consecutive
    frame pairs where both frames show it of |Δcentroid − velocity| (pixels); NaN when no pair does."""
    track = object_track(frames, colour)
    steps = track[1:] - track[:-1] - np.array([velocity[1], velocity[0]], dtype=np.float64)  # (dy, dx)
    distance = np.linalg.norm(steps, axis=1)
    distance = distance[np.isfinite(distance)]
    return float(distance.mean()) if len(distance) else float("nan")
