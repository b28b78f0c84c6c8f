"""A trace of one Text2Video-Zero generation: the intermediate states of Algorithm 1 (docs/method.md, Section 2),
decoded to images with the VAE and labelled with the paper's symbols and the step they belong to.

    trace = Trace(subject=subject_region)     # toyworld.judge's: the point on the subject; or Trace(point=(30, 20))
    frames = pipe("a red circle on grass", trace=trace)        # `TextToVideoZero.__call__` fills it in
    frames = pipe("a red circle on grass", trace=True)         # a Trace() (point: the image centre), in pipe.last_trace
    write_trace("out", trace)     # out/trace.png (one labelled sheet), out/trace/*.png, trace.npz, manifest.json

What it records, for the first video of the batch (the text branch of guidance where it looks inside the UNet):
  Algorithm 1, steps 1-2  x_T¹; frame 1's x_{T₁}¹ and x_{T₀}¹ and its predicted x̂₀¹ at T₁ and at T₀
  step 3                  each warped x̃ᵏ = W_k(x_{T₀}¹) and its translation δᵏ = λ·(k−1)·δ (grid pixels)
  step 4                  each x_{T₁}ᵏ after the DDPM forward
  step 5                  the predicted x̂₀ of every frame at `x0_steps` evenly spaced steps of the video pass
  step 6                  the decoded frames, with the chunk each was denoised in (long videos, `chunk_size`)
  Eq. 8                   where the query of one point of frame k attends in frame 1 (softmax(Qᵏ·(K¹)ᵀ/√d),
                          averaged over heads) at one self-attention layer per UNet resolution, at one step of the
                          video pass, beside the same query attending within frame k (softmax(Qᵏ·(Kᵏ)ᵀ/√d), what
                          per-frame self-attention, cross_frame="off", computes), both as heat maps
  Sec. 3.3 (smooth_bg)    the foreground masks Mᵏ and, for frame k, one blend x̄ᵏ = Mᵏ⊙xᵏ + (1−Mᵏ)⊙(α·x̂ᵏ + (1−α)·xᵏ):
                          at the last step of the video pass ("paper" form) or once at T₁ ("authors" form)

Tracing changes no frame (tests/test_trace.py): the states are read as the pipeline makes them, and the only added
computations are on copies: two guided UNet calls on frame 1 alone (x̂₀¹ at T₁ and T₀, from the kept x_{T₁}¹ and
x_{T₀}¹; step 2 keeps x_{T₀}¹ only to warp it and never runs the UNet on it), the probe's projections
(`sd.attention.SelfAttentionProbe`), the VAE decodes, and nothing that draws from the generator. The video pass's
x̂₀ are the ones its own DDIM steps compute (`RecordingScheduler`). Off (trace=None or False, the default) the
pipeline runs as before: no probe is set, no state kept, nothing decoded beyond the frames.

Frame k and its point: k counts frames from 1 as the paper does (`frame`, default 2, the first moved frame); the
point (`point`, (x, y) in image pixels of frame k, x to the right, y down) defaults to the subject's centre: the
centroid of the region `subject(image, prompt)` finds in the final frame k, where a `subject` function is given
(`python -m t2vz`, the app and docs/method.md's figures give `toyworld.judge.subject_region`, the toy world's judge:
the object of the prompt's colour), else (or where it finds none) the image centre. The method layer knows nothing
of the toy world: the function comes from the caller. The maps are
drawn from queries and keys kept at the attention step, so the point is chosen after the video is made. With a
`subject` function the trace also measures how much of each map lies in the subject's region (frame 1's for the
cross-frame map, frame k's for the within-frame one): `Trace.info["attention"]`.

Which layers: one self-attention layer per resolution, finest first: the decoder's last at each level (the one
nearest the output at that resolution), and the mid block's at the deepest level where the decoder has none (SD
1.5's 8×8 latents at 512×512). Measured on the toy model (2-core Intel Xeon, torch 2.13.0+cpu; "a red circle on
grass", 50 DDIM steps, 8 frames, seeds 0-7, frames k = 2..8 where the judge finds the object in frames 1 and k: 43
pairs; the default attention step, t = 81, the 5th of the video pass's 9): the finest layer's cross-frame map (8×8
tokens, up_blocks.1.attentions.1) puts 0.71 of its mass on frame 1's object on average (median 0.76, lowest 0.37,
above 0.5 in 39 of the 43), where the object covers 0.10 of the frame (a uniform map's mass); the 4×4 layer's
(up_blocks.0.attentions.1) 0.11, no more than a uniform map: at 16×16 image pixels a token the object fills about
one token, and the layer attends broadly.
"""
from __future__ import annotations

import functools
import json
import math
import os
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..sd.attention import SelfAttentionProbe
from ..video_io import write_image, write_npz, write_text
from .chunks import frame_chunks
from .motion import warp_latents
from .sampling import decode_images, guided_eps, unfold_frames
from .smoothing import grid_scale

# the rows of the sheet, in order
FRAME_1, WARP, FORWARD, DENOISE, FRAMES, ATTENTION, SMOOTHING = (
    "Algorithm 1, steps 1-2: frame 1 alone, T → T₁ → T₀",
    "step 3: x̃ᵏ = W_k(x_{T₀}¹), the first frame moved by δᵏ = λ·(k−1)·δ",
    "step 4: x_{T₁}ᵏ, DDPM forward from T₀ to T₁",
    "step 5: x̂₀ᵏ, every frame's predicted x₀ in the video pass (cross-frame attention), at t={t}, step {i}/{n}",
    "step 6: the decoded frames",
    "Eq. 8: where frame k's point attends",
    "Sec. 3.3: background smoothing",
)
SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def sup(k: int) -> str:
    """k as superscript digits: the paper's frame index, xᵏ."""
    return str(k).translate(SUPERSCRIPTS)


@dataclass
class TraceTile:
    """One image of the trace: its sheet row (`stage`), a file-safe `key` (trace/{key}.png, and the npz key of its
    tensor), its `caption` (symbol and step), the image (H, W, 3) in [0, 1] and the raw tensor it shows: a scaled
    latent (c, h, w) that the VAE decodes, a mask or an attention map."""

    stage: str
    key: str
    caption: str
    tensor: torch.Tensor
    image: torch.Tensor | None = None
    decode: bool = True  # a latent the VAE decodes into `image`; False: `image` is drawn from the tensor


@dataclass
class Trace:
    """What to record of one generation, and (filled in by `TextToVideoZero.__call__(trace=...)`) what was.

    Settings: `frame`, k counted from 1 (None: 2, the first moved frame; 1 in a one-frame video); `point`, (x, y) in
    image pixels of frame k (None: the subject's centre, see the module's docstring); `subject`, a function
    (image (H, W, 3) in [0, 1], the prompt) → the subject's region (H, W) bool or None, that places the default
    point and measures each map's mass on the subject (None: the image centre, no masses); `attention_step`, the index
    of the video pass's DDIM step whose attention is drawn (None: the middle one); `x0_steps`, at how many evenly
    spaced steps of the video pass every frame's x̂₀ is shown (3; the first and the last among them).
    Results: `tiles` (`TraceTile`, in sheet order), `info` (the timesteps, the motion, chunks, the point, and per
    probed layer its name, grid and, with `subject`, the attention mass on the subject), `arrays` (further raw
    tensors for trace.npz: the probe's queries and keys, δᵏ, the frames)."""

    frame: int | None = None
    point: Sequence[float] | None = None
    subject: Callable[[torch.Tensor, str], np.ndarray | None] | None = None
    attention_step: int | None = None
    x0_steps: int = 3
    tiles: list[TraceTile] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        if self.frame is not None and (isinstance(self.frame, bool) or not isinstance(self.frame, int)
                                       or self.frame < 1):
            raise ValueError(f"trace frame={self.frame!r} must be an integer >= 1 (k counts frames from 1, as the "
                             "paper does), or None for frame 2")
        if self.point is not None:
            ok = isinstance(self.point, (list, tuple)) and len(self.point) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.point)
            if not ok:
                raise ValueError(f"trace point={self.point!r} must be two finite numbers (x, y), image pixels of "
                                 "frame k, or None for the subject's centre")
        if self.subject is not None and not callable(self.subject):
            raise ValueError(f"trace subject={self.subject!r} must be a function (image, prompt) -> region or None, "
                             "e.g. t2vz.toyworld.judge.subject_region, or None for the image centre")
        if self.attention_step is not None and (isinstance(self.attention_step, bool)
                                                or not isinstance(self.attention_step, int)
                                                or self.attention_step < 0):
            raise ValueError(f"trace attention_step={self.attention_step!r} must be an integer >= 0 (a step of the "
                             "video pass, 0 its first), or None for the middle one")
        if isinstance(self.x0_steps, bool) or not isinstance(self.x0_steps, int) or self.x0_steps < 1:
            raise ValueError(f"trace x0_steps={self.x0_steps!r} must be an integer >= 1")

    # ----------------------------------------------------------------------------------------------- reading
    def stages(self) -> list[str]:
        """The sheet's rows that hold tiles, in the algorithm's order (step 5's rows in the order of their steps)."""
        order = [FRAME_1, WARP, FORWARD, DENOISE, FRAMES, ATTENTION, SMOOTHING]
        prefix = DENOISE.split("{")[0]
        rank = {stage: order.index(DENOISE if stage.startswith(prefix) else stage)
                for stage in dict.fromkeys(tile.stage for tile in self.tiles)}
        return sorted(rank, key=rank.get)  # stable: step 5's rows keep the order they were recorded in

    def tile(self, key: str) -> TraceTile:
        """The tile named `key` (KeyError naming the keys there are)."""
        for tile in self.tiles:
            if tile.key == key:
                return tile
        raise KeyError(f"no trace tile {key!r}; the tiles are {', '.join(t.key for t in self.tiles)}")


def trace_argument(trace) -> Trace | None:
    """`TextToVideoZero.__call__`'s `trace`: None or False → None (no trace), True → a new Trace, a Trace → itself
    (its results cleared); anything else is a ValueError saying what to give."""
    if trace is None or trace is False:
        return None
    if trace is True:
        return Trace()
    if isinstance(trace, Trace):
        trace.tiles, trace.info, trace.arrays = [], {}, {}
        return trace
    raise ValueError(f"trace={trace!r} must be True, False, None or a t2vz.method.trace.Trace")


def probe_layers(unet: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """One self-attention layer per resolution level of `unet`, finest first: (level, name, attn1). The decoder's
    last at each level that has attention there, and the mid block's at the deepest level if the decoder has none
    there."""
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet: the module it wraps
    names = {module: name for name, module in unet.named_modules()}
    depth, chosen = len(unet.up_blocks), {}
    for i, block in enumerate(unet.up_blocks):
        if len(block.attentions):
            chosen[depth - 1 - i] = block.attentions[-1].transformer_blocks[-1].attn1
    if depth - 1 not in chosen:
        chosen[depth - 1] = unet.mid_block.attentions[0].transformer_blocks[-1].attn1
    return [(level, names[attn], attn) for level, attn in sorted(chosen.items())]


class RecordingScheduler:
    """The video pass's DDIM scheduler, watched: `step` is the scheduler's own, its result returned unchanged, and
    `on_step(i, t, x̂₀)` sees the step's index in the pass, its timestep and the x̂₀ the step computed. Everything
    else is the scheduler's."""

    def __init__(self, scheduler, on_step: Callable[[int, int, torch.Tensor], None]):
        self.scheduler, self.on_step, self.index = scheduler, on_step, 0

    def step(self, eps: torch.Tensor, t, x: torch.Tensor, generator=None):
        x_prev, x0 = self.scheduler.step(eps, t, x, generator=generator)
        self.on_step(self.index, int(t), x0)
        self.index += 1
        return x_prev, x0

    def __getattr__(self, name):
        return getattr(self.scheduler, name)


class Tracer:
    """Records one generation into a `Trace`: `TextToVideoZero.__call__` makes it once the options and the text are
    known (it refuses a bad frame, point or step there, before any denoising), calls each recording method where
    its state is made, and `finish` with the frames. Every recorded tensor is a copy of video 0's rows."""

    def __init__(self, trace: Trace, sd, options, prompts: list[str] | None, batch: int, context: torch.Tensor,
                 added_cond, scheduler):
        self.trace, self.sd, self.o = trace, sd, options
        self.prompts, self.b, self.context, self.added_cond, self.scheduler = prompts, batch, context, \
            added_cond, scheduler
        o, f = options, int(options.num_frames)
        self.f = f
        self.video_steps = o.t1 + 1 if o.motion_dynamics else o.num_inference_steps
        self.k = (min(2, f) if trace.frame is None else trace.frame)  # counted from 1
        if self.k > f:
            raise ValueError(f"trace frame={self.k} is beyond the video's {f} frames: give 1 <= frame <= {f}")
        if trace.point is not None:
            x, y = (float(v) for v in trace.point)
            if not (0 <= x < o.width and 0 <= y < o.height):
                raise ValueError(f"trace point (x={x:g}, y={y:g}) lies outside frame {self.k}'s {o.width}×{o.height} "
                                 f"image: give 0 <= x < {o.width} and 0 <= y < {o.height} (image pixels, x to the "
                                 "right, y down), or point=None for the subject's centre")
        step = self.video_steps // 2 if trace.attention_step is None else trace.attention_step
        if step >= self.video_steps:
            raise ValueError(f"trace attention_step={step} is beyond the video pass's {self.video_steps} DDIM steps: "
                             f"give 0 <= attention_step <= {self.video_steps - 1}")
        self.attention_step = step
        self.x0_indices = sorted({round(i) for i in np.linspace(0, self.video_steps - 1, trace.x0_steps)})
        self.chunks = frame_chunks(f, o.chunk_size)
        self.probe = None
        if o.merging_ratio == 0:  # merged tokens (ToMe) are no grid the point can be placed on
            self.layers = probe_layers(sd.unet)
            group = self.b if o.guidance_scale > 1.0 else 0  # the text branch of video 0
            self.probe = SelfAttentionProbe([attn for _, _, attn in self.layers], self.k - 1, self.chunks, group)
        trace.info.update({
            "prompt": prompts[0] if prompts else None, "num_frames": f, "frame_k": self.k,
            "height": o.height, "width": o.width, "num_inference_steps": o.num_inference_steps,
            "guidance_scale": o.guidance_scale, "motion_strength": o.motion_strength,
            "direction": [float(d) for d in o.direction], "t0": o.t0, "t1": o.t1,
            "motion_dynamics": o.motion_dynamics, "cross_frame": o.cross_frame, "smooth_bg": o.smooth_bg,
            "chunks": [[i + 1 for i in ids] for ids in self.chunks], "chunk_size": o.chunk_size,
        })
        if o.smooth_bg:
            trace.info.update({"smoothing": o.smoothing, "alpha": o.alpha})
        if self.probe is None:
            trace.info["attention_skipped"] = (f"token merging (merging_ratio={o.merging_ratio}) merges the tokens "
                                               "of self-attention: no grid to place the point on")

    def add(self, stage: str, key: str, caption: str, tensor: torch.Tensor, decode: bool = True,
            image: torch.Tensor | None = None) -> None:
        self.trace.tiles.append(TraceTile(stage, key, caption, tensor.detach().float().cpu().clone(), image, decode))

    # -------------------------------------------------------------------------------------- Algorithm 1, 1-4
    def first_noise(self, x_T: torch.Tensor, given: bool) -> None:
        """Step 1: x_T¹ (b, c, h, w), drawn or the caller's `latents`."""
        T = int(self.scheduler.timesteps[0])
        self.add(FRAME_1, "x_T_1", f"x_T¹, T={T}" + (" (given)" if given else ""), x_T[0])

    def predicted_x0(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t with ε̂ from one guided UNet call on x (b, c, h, w) at t, frame 1 alone
        (plain self-attention, as in step 2), no fast modes and no draw from the generator."""
        eps = guided_eps(self.sd.unet, x, torch.tensor(t, device=x.device), self.context, self.o.guidance_scale,
                         added_cond=self.added_cond)
        a = float(self.scheduler.alpha_bar(t))
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)

    def first_frame(self, first) -> None:
        """Step 2: frame 1's kept latents x_{T₁}¹ and x_{T₀}¹ and the x̂₀¹ predicted from each."""
        T1, T0 = first.T1, first.T0
        self.trace.info.update({"T1": T1, "T0": T0})
        self.add(FRAME_1, "x_T1_1", f"x¹ at T₁={T1}", first.x_T1[0])
        self.add(FRAME_1, "x0hat_T1_1", f"x̂₀¹ at T₁={T1}", self.predicted_x0(first.x_T1, T1)[0])
        self.add(FRAME_1, "x_T0_1", f"x¹ at T₀={T0}", first.x_T0[0])
        self.add(FRAME_1, "x0hat_T0_1", f"x̂₀¹ at T₀={T0}", self.predicted_x0(first.x_T0, T0)[0])

    def warped(self, warped: torch.Tensor, path: torch.Tensor) -> None:
        """Step 3: x̃ᵏ for k = 2..m (video 0's rows of ((b (f−1)), c, h, w)) and each frame's motion: δᵏ, the
        translation of its affine map [A | δᵏ] in 512-grid pixels (A = I for the paper's translation)."""
        self.trace.arrays["path"] = path.numpy()
        for k in range(2, self.f + 1):
            a, shift = path[k - 1, :, :2], path[k - 1, :, 2].tolist()
            what = f"δ{sup(k)}=({shift[0]:g}, {shift[1]:g})" if torch.equal(a, torch.eye(2, dtype=a.dtype)) \
                else f"W_{k}: A≠I, b=({shift[0]:.3g}, {shift[1]:.3g})"
            self.add(WARP, f"warped_{k}", f"x̃{sup(k)}, {what}", warped[k - 2])

    def at_T1(self, x_T1: torch.Tensor) -> None:
        """Step 4: x_{T₁}ᵏ for k = 2..m, after the DDPM forward (x_T1 (b, c, f, h, w)); without motion dynamics
        (the ablation) every frame's own x_T."""
        T = int(self.scheduler.timesteps[-self.video_steps])
        for k in range(2, self.f + 1):
            caption = f"x{sup(k)} at T₁={T}" if self.o.motion_dynamics else f"x_T{sup(k)}, own noise, T={T}"
            self.add(FORWARD, f"x_T1_{k}", caption, x_T1[0, :, k - 1])

    # ----------------------------------------------------------------------------------- smoothing (Sec. 3.3)
    def smoothing_masks(self, foreground: torch.Tensor) -> None:
        """The foreground masks Mᵏ (b, f, h, w) in [0, 1] at latent resolution, video 0's."""
        for k in range(1, self.f + 1):
            self.add(SMOOTHING, f"mask_{k}", f"M{sup(k)}, foreground", foreground[0, k - 1], decode=False)

    def smoothing_blend(self, before: torch.Tensor, after: torch.Tensor, path: torch.Tensor, t: int) -> None:
        """One blend for frame k: xᵏ before, x̂ᵏ = W_k(x¹) and x̄ᵏ after, latents (b, c, f, h, w) at timestep t."""
        k = self.k if self.k > 1 else min(2, self.f)
        if k == 1:
            return
        warped = warp_latents(before[:1, :, 0], path[k - 1 : k])[0]
        alpha = self.o.alpha
        self.add(SMOOTHING, f"blend_before_{k}", f"x{sup(k)} before the blend, t={t}", before[0, :, k - 1])
        self.add(SMOOTHING, f"blend_warped_{k}", f"x̂{sup(k)} = W_{k}(x¹), t={t}", warped)
        self.add(SMOOTHING, f"blend_after_{k}", f"x̄{sup(k)}, α={alpha:g}: M⊙x + (1−M)⊙(αx̂ + (1−α)x)",
                 after[0, :, k - 1])

    def watched_blend(self, blend: Callable, path: torch.Tensor, last_t: int) -> Callable:
        """The paper form's per-step blend (a DDIM step callback on ((b f), c, h, w)), returning what it returns;
        at the video pass's last step (`last_t`) it records the blend (`smoothing_blend`, frames moved by `path`)."""
        def watched(t: int, x: torch.Tensor) -> torch.Tensor:
            blended = blend(t, x)
            if t == last_t:
                self.smoothing_blend(unfold_frames(x, self.f), unfold_frames(blended, self.f), path, t)
            return blended
        return watched

    # ------------------------------------------------------------------------------------ step 5, the video pass
    def watch_video_pass(self, denoise: dict) -> dict:
        """The video pass's arguments (`denoise_frames`) with its scheduler watched (`RecordingScheduler`): x̂₀ at
        the chosen steps, and the probe armed for the attention step."""
        timesteps = [int(t) for t in denoise["timesteps"]]
        self.trace.info["video_timesteps"] = timesteps
        self.trace.info["x0_steps"] = [timesteps[i] for i in self.x0_indices]
        self.trace.info["attention_t"] = timesteps[self.attention_step]
        if self.probe is not None and self.attention_step == 0:
            self.probe.arm()

        def on_step(i: int, t: int, x0: torch.Tensor) -> None:
            if i in self.x0_indices:
                stage = DENOISE.format(t=t, i=i + 1, n=len(timesteps))
                for k in range(1, self.f + 1):
                    self.add(stage, f"x0hat_step{i + 1}_{k}", f"x̂₀{sup(k)} at t={t}", x0[k - 1])
            if self.probe is not None:
                (self.probe.arm if i + 1 == self.attention_step else self.probe.disarm)()
        return {**denoise, "scheduler": RecordingScheduler(denoise["scheduler"], on_step)}

    @contextmanager
    def probing(self):
        """The probe on its layers for the video pass (and off them afterwards, whatever happens)."""
        if self.probe is None:
            yield
            return
        with self.probe:
            yield

    # --------------------------------------------------------------------------------------------- the end
    def finish(self, x_0: torch.Tensor, video: torch.Tensor) -> Trace:
        """Steps 5-6's result (x_0 ((b f), c, h, w), video (b, f, H, W, 3)), the attention maps, and every latent
        tile decoded by the VAE."""
        trace, frames = self.trace, video[0]
        for k in range(1, self.f + 1):
            chunk = next(i for i, ids in enumerate(self.chunks) if k - 1 in ids)
            caption = f"frame {k}" + (f", chunk {chunk + 1}/{len(self.chunks)}" if len(self.chunks) > 1 else "")
            self.add(FRAMES, f"frame_{k}", caption, x_0[k - 1], image=frames[k - 1])
        trace.arrays["frames"] = frames.numpy()
        for tile in trace.tiles:
            if tile.image is None and tile.decode:
                latent = tile.tensor[None].to(device=self.sd.device, dtype=self.sd.dtype)
                tile.image = decode_images(self.sd, latent)[0].permute(1, 2, 0).float().cpu()
            elif tile.image is None:
                tile.image = mask_image(tile.tensor, tuple(frames.shape[1:3]))
        if self.probe is not None:
            self.attention_maps(frames)
        return trace

    def subject(self, image: torch.Tensor) -> np.ndarray | None:
        """The subject's region (H, W) bool in `image`, by the trace's `subject` function and the first prompt;
        None without one, without a prompt (embeddings given), or where it finds none."""
        if self.trace.subject is None or not self.prompts:
            return None
        return self.trace.subject(image, self.prompts[0])

    def attention_maps(self, frames: torch.Tensor) -> None:
        """Eq. 8's map and the within-frame map of frame k's point at each probed layer, as tiles over the final
        frames 1 and k; with a `subject` function, each map's mass on the subject's region."""
        trace, k, (H, W) = self.trace, self.k, tuple(frames.shape[1:3])
        first_region, own_region = self.subject(frames[0]), self.subject(frames[k - 1])
        if trace.point is not None:
            x, y = (float(v) for v in trace.point)
            source = "given"
        elif own_region is not None:
            y, x = (float(v) for v in np.argwhere(own_region).mean(0))
            source = f"the centroid of the judge's object region in frame {k}"
        else:
            x, y, source = W / 2, H / 2, "the image centre"
        t = trace.info["attention_t"]
        trace.info["point"] = {"x": x, "y": y, "source": source}
        self.add(ATTENTION, f"point_{k}", f"frame {k}, point ({x:.0f}, {y:.0f})", frames[k - 1],
                 image=marked(frames[k - 1], x, y))
        h, w = (s // self.sd.vae.downsample_factor for s in (H, W))
        layers = []
        for level, name, attn in self.layers:
            if not self.probe.recorded(attn):
                layers.append({"name": name, "level": level, "recorded": False})
                continue
            n = self.probe.queries[attn].shape[0]
            scale = grid_scale(h, w, n)
            th, tw = math.ceil(h / scale), math.ceil(w / scale)
            token = min(int(y * th / H), th - 1) * tw + min(int(x * tw / W), tw - 1)
            record = {"name": name, "level": level, "grid": [th, tw], "token": token, "recorded": True}
            for own, region, base, frame_no in ((False, first_region, frames[0], 1),
                                                (True, own_region, frames[k - 1], k)):
                weights = self.probe.weights(attn, token, own=own).reshape(th, tw).cpu()
                tag = "own" if own else "first"
                symbol = f"Q{sup(k)}·K{sup(k)}ᵀ, within frame {k} (off)" if own else \
                    f"Q{sup(k)}·K¹ᵀ over frame 1 (cross-frame)"
                caption = f"{symbol}, {th}×{tw}, t={t}"
                if region is not None:
                    cover = F.adaptive_avg_pool2d(torch.from_numpy(region).float()[None, None], (th, tw))[0, 0]
                    record[f"mass_{tag}"] = float((weights * cover).sum())
                    record[f"chance_{tag}"] = float(cover.mean())  # a uniform map's mass on the region
                    caption += f", {record[f'mass_{tag}']:.2f} on the object"
                image = heat_image(weights, base)
                if own:
                    image = marked(image, x, y)
                self.add(ATTENTION, f"attn_L{level}_{tag}", caption, weights, image=image)
                self.trace.arrays[f"attn_L{level}_queries"] = self.probe.queries[attn].cpu().numpy()
                self.trace.arrays[f"attn_L{level}_keys_first"] = self.probe.keys_first[attn].cpu().numpy()
                self.trace.arrays[f"attn_L{level}_keys_own"] = self.probe.keys_own[attn].cpu().numpy()
            layers.append(record)
        trace.info["attention"] = layers
        if not any(layer["recorded"] for layer in layers):
            trace.info["attention_skipped"] = (f"no probed layer ran at t={t}: feature caching "
                                               f"(cache_interval={self.o.cache_interval}) skipped them at this step; "
                                               "choose a full step as attention_step")


# -------------------------------------------------------------------------------------------------- drawing
def mask_image(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A mask (h, w) in [0, 1] → a grey image (H, W, 3), nearest-upsampled so each latent pixel stays a block."""
    grey = F.interpolate(mask.float()[None, None], size=size, mode="nearest")[0, 0].clamp(0, 1)
    return grey[..., None].expand(*size, 3).clone()


def heat_image(weights: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """An attention map (th, tw) over a frame (H, W, 3): the map, divided by its maximum and nearest-upsampled
    (one block per token), in a black-red-yellow-white scale, over the frame darkened to half."""
    v = weights / weights.max().clamp_min(1e-12)
    v = F.interpolate(v[None, None], size=tuple(base.shape[:2]), mode="nearest")[0, 0]
    heat = torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], dim=-1)
    return (0.45 * base.float() + 0.55 * heat).clamp(0, 1)


def marked(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """A copy of `image` (H, W, 3) with a cross at pixel (x, y): cyan arms with a black border."""
    out, (H, W) = image.clone(), image.shape[:2]
    cx, cy, r = int(x), int(y), max(2, min(H, W) // 16)
    for colour, width in ((torch.tensor([0.0, 0.0, 0.0]), 1), (torch.tensor([0.0, 1.0, 1.0]), 0)):
        out[max(cy - width, 0) : cy + width + 1, max(cx - r, 0) : cx + r + 1] = colour
        out[max(cy - r, 0) : cy + r + 1, max(cx - width, 0) : cx + width + 1] = colour
    return out


@functools.lru_cache(maxsize=4)
def caption_font(size: int):
    """(font, plain): DejaVu Sans at `size` where installed (it has the paper's symbols), else PIL's default
    font (its scalable one, or its bitmap one without FreeType), and then captions are written in plain ASCII
    (`ascii_caption`)."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), False
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size), True
    except (OSError, TypeError, ImportError):  # no FreeType, or Pillow before 10.1: the one-size bitmap font
        bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
        return bitmap(), True


ASCII = {"̂": "^", "̃": "~", "̄": "-", "δ": "delta", "α": "alpha", "λ": "lambda", "ε": "eps", "→": "->",
         "×": "x", "·": "*", "⊙": "*", "−": "-", "≠": "!=", "ᵏ": "^k", "ᵀ": "^T", "…": "...", "≤": "<="}


def ascii_caption(text: str) -> str:
    """A caption in ASCII for a font without the paper's symbols: x̂₀¹ → x^_0^1, δᵏ → delta^k, T₁ → T_1."""
    out = []
    for ch in text:
        if ch in ASCII:
            out.append(ASCII[ch])
        elif ch in "₀₁₂₃₄₅₆₇₈₉":
            out.append("_" + str("₀₁₂₃₄₅₆₇₈₉".index(ch)))
        elif ch in "⁰¹²³⁴⁵⁶⁷⁸⁹":
            out.append("^" + str("⁰¹²³⁴⁵⁶⁷⁸⁹".index(ch)))
        else:
            out.append(unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "?")
    return "".join(out)


def wrap(text: str, font, width: int, lines: int) -> list[str]:
    """`text` broken at spaces into at most `lines` lines no wider than `width` pixels (the last one cut)."""
    out, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            out.append(line)
            line = word
    out.append(line)
    if len(out) > lines:
        out = out[: lines - 1] + [" ".join(out[lines - 1 :])]
    return out[:lines]


def trace_sheet(trace: Trace, tile_size: int | None = None) -> torch.Tensor:
    """The trace as one labelled sheet (H, W, 3) in [0, 1]: a row per stage, its title above it, each tile
    captioned with its symbol and step below it. `tile_size`: the tiles' width in pixels (None: the frame width
    within 160..256)."""
    from PIL import Image, ImageDraw

    if not trace.tiles:
        raise ValueError("the trace is empty: pass trace=True (or a Trace) to TextToVideoZero.__call__ first")
    H, W = trace.tiles[0].image.shape[:2]
    size = tile_size or min(max(W, 160), 256)
    tile_h = round(size * H / W)
    font, plain = caption_font(11)
    title_font, _ = caption_font(13)
    text = ascii_caption if plain else (lambda s: s)
    pad, line, lines, title_line = 6, 13, 3, 16
    title = 2 * title_line + 4  # two lines of row title

    rows = [[t for t in trace.tiles if t.stage == stage] for stage in trace.stages()]
    columns = max(len(r) for r in rows)
    width = pad + columns * (size + pad)
    row_h = title + tile_h + lines * line + 2 * pad
    sheet = Image.new("RGB", (width, pad + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, tiles in enumerate(rows):
        top = pad + r * row_h
        heading = wrap(text(stage_title(trace, tiles[0].stage)), title_font, width - 2 * pad, 2)
        for i, part in enumerate(heading):
            draw.text((pad, top + 2 + i * title_line), part, fill="black", font=title_font)
        for c, tile in enumerate(tiles):
            left = pad + c * (size + pad)
            pixels = (tile.image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            image = Image.fromarray(pixels).resize((size, tile_h), Image.NEAREST if size >= W else Image.LANCZOS)
            sheet.paste(image, (left, top + title))
            for i, caption in enumerate(wrap(text(tile.caption), font, size, lines)):
                draw.text((left, top + title + tile_h + 1 + i * line), caption, fill="black", font=font)
    return torch.from_numpy(np.asarray(sheet).copy()).float() / 255


def stage_title(trace: Trace, stage: str) -> str:
    """A row's title, with what the trace knows of it: the chunks of step 6, the layers' step of Eq. 8."""
    info = trace.info
    if stage == FRAMES and len(info.get("chunks", [])) > 1:
        spans = " | ".join(f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else f"{ids[0]}" for ids in info["chunks"])
        return f"{stage}, denoised in chunks of {info['chunk_size']} frames: {spans}"
    if stage == ATTENTION and "attention_skipped" in info:
        return f"{stage}: not drawn, {info['attention_skipped']}"
    if stage == ATTENTION and "attention" in info:
        k = info["frame_k"]
        return (f"{stage} (frame k={k}, t={info['attention_t']}): in frame 1 (Eq. 8) and within frame {k}, one "
                f"self-attention layer per resolution, averaged over heads; the video was made with "
                f"cross_frame={info['cross_frame']}")
    if stage == SMOOTHING and "alpha" in info:
        return f"{stage} ({info['smoothing']} form, α={info['alpha']:g})"
    return stage


# -------------------------------------------------------------------------------------------------- writing
def write_trace(folder: str | os.PathLike, trace: Trace) -> list[str]:
    """Write a filled-in trace into a run folder: `trace.png` (`trace_sheet`) and `trace/`, holding each tile as
    `{key}.png`, the raw tensors in `trace.npz` (each tile's under its key, beside `keys` and `captions`, the
    labels, and the arrays of `Trace.arrays`) and `manifest.json` (per tile: key, stage, caption, file; and
    `Trace.info`). Every file is written atomically. Returns the names written, relative to `folder`."""
    if not trace.tiles:
        raise ValueError("the trace is empty: pass trace=True (or a Trace) to TextToVideoZero.__call__ first")
    folder = Path(folder)
    sub = folder / "trace"
    manifest = {"tiles": [], "info": trace.info}
    arrays = dict(trace.arrays)
    for tile in trace.tiles:
        write_image(sub / f"{tile.key}.png", tile.image)
        arrays[tile.key] = tile.tensor.numpy()
        manifest["tiles"].append({"key": tile.key, "stage": tile.stage, "caption": tile.caption,
                                  "file": f"trace/{tile.key}.png", "shape": list(tile.tensor.shape)})
    arrays["keys"] = np.array([t.key for t in trace.tiles])
    arrays["captions"] = np.array([t.caption for t in trace.tiles])
    write_npz(sub / "trace.npz", arrays)
    write_text(sub / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    write_image(folder / "trace.png", trace_sheet(trace))
    return ["trace.png", "trace/"]
