"""Text2Video-Zero (Khachatryan et al., ICCV 2023): text-to-video with a text-to-image model and no training.

Algorithm 1 of the paper (docs/method.md), one named function per step, called in order by
`TextToVideoZero.__call__`:
  1. `draw_first_frame_noise`   x_T¹ ~ N(0, I)
  2. `first_frame_trajectory`   DDIM on frame 1 from T to T₁, then on to T₀                    (DDIM Eq. 12)
  3. `warp_first_frame`         x̃_{T₀}ᵏ = W_k(x_{T₀}¹), δᵏ = λ·(k−1)·δ (`motion_path`)        (Sec. 3.3)
  4. `noise_to_T1`              x_{T₁}ᵏ ~ q(x_{T₁} | x̃_{T₀}ᵏ) for k = 2..m (`ddpm_forward`)    (DDPM Eq. 4)
  5. `denoise_frames`           DDIM from T₁ to 0 on all frames with cross-frame attention    (Eq. 8)
  6. `sampling.decode_video`    VAE decode of every frame, [−1, 1] → [0, 1]
For long videos step 5 runs the UNet on a chunk of frames at a time (`chunks.eps_by_chunks`). Background
smoothing (Sec. 3.3) lives in `smoothing.py`; the options, their defaults and their checks in `VideoOptions`.

`trace=True` (or a `trace.Trace`) records the intermediate states of one generation, decoded and labelled with the
paper's symbols (`trace.py`; `pipe.last_trace`, `trace.write_trace`).

Image-to-video (t2vz's extension, not in the paper): with `image=`, steps 1 and 2 become `invert_first_frame`,
the picture encoded by the VAE and DDIM-inverted (`inversion.py`) up to T₁, keeping x_{T₀}¹ on the way; steps 3 to
6 run unchanged from there, so frame 1 regenerates the picture and the later frames are the picture, moved.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import torch
from einops import rearrange, repeat

from ..sd.attention import CrossFrame, check_cross_frame_levels, check_cross_frame_mode
from ..sd.loading import StableDiffusion, load
from ..sd.schedulers import DDIM, DDPM, draw_noise
from .chunks import check_chunking, eps_by_chunks
from ..video_io import load_image, resize_frames
from .fast import FastModes
from .inversion import ddim_invert
from .motion import translation_path, warp_latents
from .sampling import (
    TextConditioning, chain, check_size, checked_latents, ddim_denoise, ddim_loop, decode_video, encode_prompts,
    fold_frames, guided_eps, refuse_sdxl_options, sdxl_time_ids, step_counter, unfold_frames,
)
from .smoothing import (
    SMOOTHING_FORMS, CrossAttentionMaps, masks_from_maps, resize_masks, smooth_video, token_positions,
)
from .trace import Trace, Tracer, trace_argument

DDPM_MARGINALS = ("exact", "reference")
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- the six steps
def check_masks(masks: torch.Tensor | None, b: int, f: int) -> None:
    """Background smoothing's given foreground masks: one per frame, (f, H, W) for one video or (b, f, H, W)."""
    if masks is None:
        return
    if masks.ndim not in (3, 4) or masks.shape[-3] != f or masks.numel() != b * f * masks.shape[-2] * masks.shape[-1]:
        raise ValueError(f"masks of shape {tuple(masks.shape)} for {b} video(s) of {f} frames: give one mask per "
                         f"frame, ({f}, H, W) for one video or ({b}, {f}, H, W)")


def draw_first_frame_noise(shape: tuple[int, ...], generator, device, dtype) -> torch.Tensor:
    """Step 1: x_T¹ ~ N(0, I) for every video, (b, c, h, w); the first draw from `generator`."""
    return draw_noise(shape, generator, device, dtype)


def motion_timesteps(timesteps: torch.Tensor, t0: int, t1: int) -> tuple[int, int]:
    """(T₁, T₀) = (timesteps[−t1−1], timesteps[−t0−1]): t0 ≤ t1 count steps from the end of the list, as in both
    references, so Δt = t1 − t0 DDIM steps separate T₁ ≥ T₀ (941 and 881 at 50 steps with t0=44, t1=47).
    Δt = 0 (an ablation point) warps x_{T₁}¹ itself and adds no noise, as both references do for t0 = t1."""
    n = len(timesteps)
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, bool) or int(value) != value or not 0 <= value <= n - 1:
            raise ValueError(
                f"{name}={value} is out of range for {n} DDIM steps: t0 and t1 count steps from the end of the "
                f"timestep list and must lie in 0..{n - 1} (the paper's t0=44, t1=47 need at least 48 steps); "
                "leave t0 and t1 unset to use the model's own, moved to this step count"
            )
    if t0 > t1:
        raise ValueError(f"t0={t0} must not exceed t1={t1} (Δt = t1 − t0 DDIM steps; 0 warps at T₁ itself)")
    return int(timesteps[-t1 - 1]), int(timesteps[-t0 - 1])


REFERENCE_STEPS = 50  # the DDIM step count at which the paper's t0, t1 (and a model folder's own) are given


def t0_t1_for_steps(t0: int, t1: int, num_inference_steps: int) -> tuple[int, int]:
    """A model's own t0, t1, given at 50 steps, at another step count: the positions (from the end) of the
    timesteps nearest the ones they name at 50 steps, so that the motion is injected at the same noise levels.
    SD 1.5's t0 = 44, t1 = 47 name T₀ = 881, T₁ = 941; at 20 steps the nearest are 901 and 951, t0 = 18, t1 = 19.
    The result is always valid where any is (2 steps or more): t1 is kept within 1…steps − 1, so that at least the
    last step denoises all frames (the toy model's step 8, T = 161, is nearest the last step, t = 0, at 2 and 3
    steps: t1 = 1), and t0 within 0…t1, equal to t1 where the model's own are equal (Δt = 0 stays 0). Unchanged at
    50 steps, and where t0, t1 do not name steps of the 50-step schedule or the step count is not one (the checks
    that follow say why)."""
    steps_ok = isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool) \
        and 2 <= num_inference_steps <= DDIM(REFERENCE_STEPS).num_train_timesteps
    if not steps_ok or num_inference_steps == REFERENCE_STEPS or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < REFERENCE_STEPS for v in (t0, t1)) \
            or t0 > t1:
        return t0, t1
    reference, timesteps = DDIM(REFERENCE_STEPS).timesteps, DDIM(num_inference_steps).timesteps

    def nearest(t: int) -> int:
        index = int(torch.argmin((timesteps - reference[-t - 1]).abs()))  # a tie takes the noisier one
        return len(timesteps) - 1 - index
    moved_t1 = min(max(nearest(t1), 1), num_inference_steps - 1)
    return (moved_t1 if t0 == t1 else min(nearest(t0), moved_t1)), moved_t1


def motion_path(frame_ids: Sequence[int], motion_strength: float, direction: Sequence[float]) -> torch.Tensor:
    """Step 3's motion: frame k (0-based id) translated by δᵏ = λ·k·δ, as 2×3 affine maps (f, 2, 3)."""
    return translation_path(frame_ids, motion_strength, direction)


def ddpm_forward(x_t0: torch.Tensor, T0: int, T1: int, generator, marginal: str = "exact") -> torch.Tensor:
    """Step 4: x_{T₁} = √a·x_{T₀} + √(1−a)·ε with a = ᾱ_{T₁}/ᾱ_{T₀} ("exact") or ∏ α[T₀:T₁] ("reference"),
    ε drawn from `generator` in x's shape: x_t0 ((b f), c, h, w) → same."""
    noise = draw_noise(tuple(x_t0.shape), generator, x_t0.device, x_t0.dtype)  # drawn even for Δt = 0, as the
    if T0 == T1:                                                                # references do: same stream
        return x_t0
    return DDPM().forward(x_t0, T0, T1, noise, marginal=marginal)


@dataclass
class FirstFrameTrajectory:
    """The first frame's DDIM trajectory: its latents at T₁ and T₀, (b, c, h, w) each."""

    x_T1: torch.Tensor
    x_T0: torch.Tensor
    T1: int
    T0: int


# --------------------------------------------------------------------------------------------- the options
SDXL_SIZE_OPTIONS = ("original_size", "crops_coords_top_left", "target_size")


def check_micro_conditioning(o: VideoOptions, family: str) -> None:
    """SDXL's size options: SDXL models only (ValueError naming them on SD 1.5), each two integers >= 0."""
    given = [name for name in SDXL_SIZE_OPTIONS if getattr(o, name) is not None]
    refuse_sdxl_options(given, family)
    for name in given:
        value = getattr(o, name)
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        if not ok:
            raise ValueError(f"{name}={value!r} must be two integers >= 0 (height, width; top, left for the crop)")


@dataclass
class VideoOptions:
    """Every option of `TextToVideoZero.__call__`, with its default; `resolve` checks them against a model.

    The config of `python -m t2vz` (`experiment/config.py`) uses the same names in its `video`, `sampler` and
    `method` groups. λ, t0 and t1 left None are the model's own (`StableDiffusion.method_defaults`: the paper's
    12, 44, 47 unless its folder sets others; the toy model's are in its t2vz_model.json)."""

    num_frames: int = 8
    height: int | None = None                # pixels; None: the model's own size (512 for SD 1.5)
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str | Sequence[str] | None = None
    num_videos_per_prompt: int = 1
    eta: float = 0.0
    motion_strength: float | None = None     # λ, pixels of a 512×512 reference grid (both references' unit)
    direction: Sequence[float] = (1.0, 1.0)  # δ = (δx, δy)
    t0: int | None = None                    # t0 ≤ t1 count DDIM steps from the end; Δt = t1 − t0
    t1: int | None = None
    delta_t: int | None = None               # Δt = t1 − t0: with t0 None, t0 = t1 − Δt
    motion: Callable[[Sequence[int]], torch.Tensor] | None = None  # frame_ids → (f, 2, 3): replaces λ·k·δ
    motion_dynamics: bool = True             # False: the paper's ablation without Sec. 3.2
    ddpm_marginal: str = "exact"             # step 4's ᾱ ratio; "reference": both references' product
    cross_frame: str = "first"               # Eq. 8: "first", "first+previous" or "off"
    cross_frame_levels: Sequence[int] | None = None  # an ablation: the UNet levels that mix frames (None: all)
    smooth_bg: bool = False                  # background smoothing (Sec. 3.3) with weight alpha
    alpha: float = 0.6
    smoothing: str = "paper"                 # "paper": every step; "authors": once at T₁
    masks: torch.Tensor | None = None        # foreground (F, H, W) or (B, F, H, W) in [0, 1]
    mask_tokens: str | None = None           # else masks from cross-attention to these words (None: all)
    chunk_size: int | None = None            # long videos: the UNet sees at most this many frames at once
    merging_ratio: float = 0.0               # fast modes (`fast.py`): token merging, ToMe for SD (0: exact)
    merging_max_downsample: int = 1          #   at the UNet levels downsampled at most this much (1: level 0)
    merging_options: dict | None = None      #   tomesd's other options: sx, sy, use_rand, merge_crossattn, ...
    cache_interval: int = 1                  #   feature caching, DeepCache: a full UNet pass every N steps (1: exact)
    cache_branch: int = 0                    #   the shallow branch run on the cached steps
    original_size: Sequence[int] | None = None          # SDXL's micro-conditioning (h, w); None: (height, width)
    crops_coords_top_left: Sequence[int] | None = None  #   (y, x); None: (0, 0)
    target_size: Sequence[int] | None = None            #   (h, w); None: (height, width)
    inversion_guidance_scale: float = 1.0    # image-to-video: the guidance frame 1's picture is inverted with

    @classmethod
    def of(cls, options: dict) -> VideoOptions:
        """Keyword arguments → VideoOptions; TypeError naming an unknown one and the known ones."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(f.name for f in fields(cls))}")
        return cls(**options)

    def resolve(self, sd: StableDiffusion) -> VideoOptions:
        """A copy with the model's own size, λ, t0, t1 where None (t0, t1 moved to the step count,
        `t0_t1_for_steps`); ValueError naming the first bad value."""
        own = dict(sd.method_defaults)
        own["t0"], own["t1"] = t0_t1_for_steps(own["t0"], own["t1"], self.num_inference_steps)
        height, width = sd.image_size(self.height, self.width)
        o = VideoOptions(**{**vars(self), "height": height, "width": width, **{
            k: own[k] for k in ("motion_strength", "t0", "t1") if getattr(self, k) is None}})
        if o.delta_t is not None:
            if isinstance(o.delta_t, bool) or not isinstance(o.delta_t, int) or o.delta_t < 0:
                raise ValueError(f"delta_t={o.delta_t!r} must be an integer >= 0 (Δt = t1 − t0 DDIM steps)")
            if self.t0 is None:
                o.t0 = o.t1 - o.delta_t
            elif o.t1 - o.t0 != o.delta_t:
                raise ValueError(f"t0={o.t0} and delta_t={o.delta_t} disagree with t1={o.t1} (t0 = t1 − Δt); give "
                                 "t0 or delta_t")
            if o.t0 < 0:
                raise ValueError(f"delta_t={o.delta_t} exceeds t1={o.t1}: t0 = t1 − Δt must be >= 0")
        if isinstance(o.num_frames, bool) or int(o.num_frames) != o.num_frames or o.num_frames < 1:
            raise ValueError(f"num_frames={o.num_frames} must be an integer >= 1")
        check_size(o.height, o.width, sd.vae.downsample_factor)
        if not math.isfinite(float(o.motion_strength)):
            raise ValueError(f"motion_strength (λ) must be a finite number, got {o.motion_strength}")
        if len(o.direction) != 2 or not all(math.isfinite(float(d)) for d in o.direction):
            raise ValueError(f"direction must be two finite numbers (δx, δy), got {tuple(o.direction)}")
        check_cross_frame_mode(o.cross_frame)
        if o.ddpm_marginal not in DDPM_MARGINALS:
            raise ValueError(f"ddpm_marginal={o.ddpm_marginal!r} is not one of {DDPM_MARGINALS}")
        check_chunking(o.chunk_size, o.cross_frame, o.num_frames)
        check_cross_frame_levels(o.cross_frame_levels, o.cross_frame, sd.unet.config.attention_levels)
        if o.smooth_bg and (o.smoothing not in SMOOTHING_FORMS or not 0.0 <= float(o.alpha) <= 1.0):
            raise ValueError(f"smoothing={o.smoothing!r} must be one of {SMOOTHING_FORMS} and alpha={o.alpha} in "
                             "[0, 1]")
        motion_timesteps(DDIM(o.num_inference_steps).timesteps, o.t0, o.t1)  # t0, t1 in range
        check_micro_conditioning(o, sd.family)
        FastModes.of(o, sd.unet.config)
        g = o.inversion_guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"inversion_guidance_scale={g!r} must be a finite number >= 0 (1: no guidance, the "
                             "usual choice for DDIM inversion)")
        return o

    def time_ids(self) -> torch.Tensor:
        """SDXL's size/crop conditioning of a resolved VideoOptions (`sampling.sdxl_time_ids`): the defaults of
        diffusers' SDXL pipelines, the output size as both the original and the target size and no crop."""
        size = (self.height, self.width)
        return sdxl_time_ids(self.original_size or size, self.crops_coords_top_left or (0, 0), self.target_size or size)

    def frame_path(self) -> torch.Tensor:
        """Every frame's motion as affine maps (f, 2, 3): `motion`, or the translation δᵏ = λ·k·δ (step 3)."""
        f = int(self.num_frames)
        path = (self.motion or (lambda ids: motion_path(ids, self.motion_strength, self.direction)))(list(range(f)))
        if tuple(path.shape) != (f, 2, 3):
            raise ValueError(f"motion(frame_ids) returned shape {tuple(path.shape)}, expected ({f}, 2, 3)")
        return path


class TextToVideoZero:
    """`pipe = TextToVideoZero.from_pretrained(path)`; `frames = pipe("a horse galloping on the street")`."""

    def __init__(self, components: StableDiffusion):
        self.sd = components
        self.last_trace: Trace | None = None  # the trace of the last call, where it was made with `trace`

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32,
                        lora=None) -> "TextToVideoZero":
        """A t2vz model folder or a shipped model's name; `lora`: [(file, scale), ...] LoRA files merged into its
        weights (`t2vz.load`)."""
        return cls(load(path, device=device, dtype=dtype, lora=lora))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = True,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        image=None,
        trace: bool | Trace | None = None,
        **options,
    ) -> torch.Tensor:
        """Generate videos: frames (F, H, W, 3) float in [0, 1] for one prompt and one video, else (B, F, H, W, 3)
        with B = prompts × videos per prompt (prompt-major).

        `options` are the fields of `VideoOptions` (num_frames, num_inference_steps, guidance_scale,
        motion_strength λ, direction δ, t0, t1, cross_frame, smooth_bg, alpha, chunk_size, …). `latents`
        (B, 4, H/8, W/8) replaces the drawn x_T¹; `callback(i, t, x)` sees the latents after every DDIM step.
        `prompt_embeds` (b, n_tokens, d) replace `prompt` (prompt=None), `negative_prompt_embeds` (same shape) the
        `negative_prompt`, as in diffusers (`sampling.encode_prompts`): B = b × videos per prompt.
        With cross_frame "first" or "off", chunked generation equals unchunked generation.
        `motion_dynamics=False` is the paper's ablation without Sec. 3.2: every frame starts from its own x_T and
        all frames are denoised from T together. `smooth_bg` blends each frame's background towards the warped
        first frame (`smoothing.py`); the foreground comes from `masks` or from the UNet's cross-attention to
        `mask_tokens`, recorded in an extra denoising pass; with `prompt_embeds` there is no prompt text to find the
        tokens in, so smoothing then needs `masks`.

        On an SDXL model (the same code: its UNet takes the added conditioning, `sampling.TextConditioning`):
        `prompt_2`/`negative_prompt_2` for the second text encoder, `pooled_prompt_embeds`/
        `negative_pooled_prompt_embeds` beside the embeddings, and the options `original_size`,
        `crops_coords_top_left`, `target_size` (SDXL's micro-conditioning, `VideoOptions.time_ids`), all as
        diffusers' `TextToVideoZeroSDXLPipeline`; an SD 1.5 model refuses them.

        `image` (an image file, a PIL image, or an (H, W, 3) array or tensor; t2vz's extension, not the paper's):
        frame 1 is that picture, the video moves it (`invert_first_frame` in place of steps 1 and 2). It is resized
        to height × width where its size differs (one logged line says so), encoded by the VAE, and DDIM-inverted
        with the prompt up to T₁ (guidance `inversion_guidance_scale`, 1 by default), each video of a batch from the
        same picture. `latents` and `motion_dynamics=False` are refused with it (the picture takes x_T's place, and
        reaches the other frames only through the motion dynamics).

        `trace` (`trace.py`): True or a `trace.Trace` records, for the first video, the intermediate states of
        Algorithm 1 (x_T¹, frame 1's x̂₀ at T₁ and T₀, each x̃ᵏ with its δᵏ, each x_{T₁}ᵏ, every frame's x̂₀ at a few
        steps of the video pass, the decoded frames and their chunks), where one point of frame k attends under
        cross-frame attention, and the smoothing masks and one blend; latents are decoded with the VAE. The
        filled-in Trace is the one given, and `self.last_trace` (None after a call without `trace`). Tracing
        changes no frame; None or False (the default) records nothing.
        """
        self.last_trace = None
        traced = trace_argument(trace)  # None, or the Trace to fill in
        o = VideoOptions.of(options).resolve(self.sd)
        if image is not None:
            for name, given in (("latents", latents is not None), ("motion_dynamics=False", not o.motion_dynamics)):
                if given:
                    raise ValueError(f"{name} cannot be used with image=: the picture is frame 1's x_0, inverted to "
                                     "T₁ in place of drawn noise, and reaches the other frames through the motion "
                                     "dynamics; drop one of them")
            picture = self.image_latents(image, o.height, o.width)
        fast = FastModes.of(o)
        merging = fast.token_merging(generator, self.sd.device)  # forked before the first draw from `generator`
        sd, f = self.sd, int(o.num_frames)
        text = encode_prompts(sd, prompt, o.negative_prompt, o.guidance_scale > 1.0, o.num_videos_per_prompt,
                              prompt_embeds, negative_prompt_embeds, prompt_2=prompt_2,
                              negative_prompt_2=negative_prompt_2, pooled_prompt_embeds=pooled_prompt_embeds,
                              negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        b, context = text.batch, text.context
        added_cond = text.added_cond(o.time_ids())  # SDXL's pooled text and sizes; None for SD 1.5
        if o.smooth_bg:
            check_masks(o.masks, b, f)
            if o.masks is None and text.prompts is None:
                raise ValueError("smooth_bg with prompt_embeds needs masks=(B, F, H, W): the attention masks find "
                                 "mask_tokens in the prompt text, which embeddings do not carry")
        scheduler = DDIM(o.num_inference_steps, eta=o.eta)
        # the trace's recorder; it checks the trace's frame, point and step against the options, before any work
        tracer = None if traced is None else Tracer(traced, sd, o, text.prompts, b, context, added_cond, scheduler)
        factor = sd.vae.downsample_factor
        shape = (b, sd.unet.config.in_channels, o.height // factor, o.width // factor)
        on_step = step_counter(callback)
        path = o.frame_path()

        if image is not None:  # image-to-video: frame 1's trajectory inverted from the picture
            first = self.invert_first_frame(picture.expand(b, -1, -1, -1), scheduler, o.t0, o.t1, text,
                                            o.inversion_guidance_scale, o.time_ids(), progress)
        else:
            x_T = (draw_first_frame_noise(shape, generator, sd.device, sd.dtype)                # 1. x_T¹
                   if latents is None else checked_latents(sd, latents, shape))
            if tracer is not None:
                tracer.first_noise(x_T, given=latents is not None)
        if o.motion_dynamics:
            if image is None:
                first = self.first_frame_trajectory(x_T, scheduler, o.t0, o.t1, context, o.guidance_scale,
                                                    generator, on_step, progress, fast.cache, merging,
                                                    added_cond)                                    # 2. T → T₁ → T₀
            warped = self.warp_first_frame(first.x_T0, path)                                     # 3. W_k(x_{T₀}¹)
            x_T1 = self.noise_to_T1(first, warped, generator, o.ddpm_marginal)                   # 4. T₀ → T₁
            timesteps = scheduler.timesteps[-o.t1 - 1 :]
            if tracer is not None:
                tracer.first_frame(first)
                tracer.warped(warped, path)
        else:  # the ablation: independent x_T per frame, all denoised from T
            x_T1, timesteps = self.independent_frames(x_T, f, generator), scheduler.timesteps
        if tracer is not None:
            tracer.at_T1(x_T1)
        denoise = dict(scheduler=scheduler, timesteps=timesteps, context=context, guidance_scale=o.guidance_scale,
                       generator=generator, cross_frame=o.cross_frame, cross_frame_levels=o.cross_frame_levels,
                       chunk_size=o.chunk_size, progress=progress, added_cond=added_cond)
        x_T1, blend = self.background_smoothing(x_T1, path, o, text, denoise, tracer)
        if tracer is not None:  # the video pass watched: x̂₀ at a few steps, the self-attention of one
            denoise = tracer.watch_video_pass(denoise)
        with nullcontext() if tracer is None else tracer.probing():
            x_0 = self.denoise_frames(x_T1, **denoise, step_callback=chain(blend, on_step),      # 5. T₁ → 0
                                      cache=fast.cache, merging=merging)
        video = decode_video(sd, x_0, f)                                                          # 6. decode
        if tracer is not None:
            self.last_trace = tracer.finish(x_0, video)
        return video[0] if video.shape[0] == 1 else video

    # ---------------------------------------------------------------------------------------------- the steps
    def first_frame_trajectory(self, x_T, scheduler, t0, t1, context, guidance_scale, generator, callback,
                               progress, cache=None, merging=None, added_cond=None) -> FirstFrameTrajectory:
        """Step 2: DDIM on frame 1 alone, T → T₁ (keep x_{T₁}¹), then T₁ → T₀ (keep x_{T₀}¹). With feature caching
        (`cache`) each of the two loops starts on a full UNet pass."""
        T1, T0 = motion_timesteps(scheduler.timesteps, t0, t1)
        ts = scheduler.timesteps
        fast = dict(cache=cache, merging=merging, added_cond=added_cond)
        x_T1 = ddim_denoise(self.sd, x_T, scheduler, ts[: -t1 - 1], context, guidance_scale, generator,
                            step_callback=callback, desc="DDIM (frame 1, T→T1)", progress=progress, **fast)
        x_T0 = ddim_denoise(self.sd, x_T1, scheduler, ts[-t1 - 1 : -t0 - 1], context, guidance_scale, generator,
                            step_callback=callback, desc="DDIM (frame 1, T1→T0)", progress=progress, **fast)
        return FirstFrameTrajectory(x_T1=x_T1, x_T0=x_T0, T1=T1, T0=T0)

    def image_latents(self, image, height: int, width: int) -> torch.Tensor:
        """Image-to-video: the picture (`video_io.load_image`), resized to height × width where it differs (logged),
        → its scaled VAE latent (1, c, h, w): the posterior's mode × scaling_factor, in the UNet's dtype."""
        picture = load_image(image, "image")
        if tuple(picture.shape[:2]) != (height, width):
            log.warning("image of %d×%d resized to %d×%d (height × width of the video)", *picture.shape[:2],
                        height, width)
            picture = resize_frames(picture[None], (height, width))[0]
        pixels = picture.permute(2, 0, 1)[None].to(self.sd.device) * 2 - 1  # [0, 1] → [−1, 1]
        x_0 = self.sd.vae.posterior(pixels).mode() * self.sd.vae.config.scaling_factor
        return x_0.to(self.sd.dtype)

    def invert_first_frame(self, x_0: torch.Tensor, scheduler: DDIM, t0: int, t1: int, text: TextConditioning,
                           guidance_scale: float, time_ids: torch.Tensor, progress: bool) -> FirstFrameTrajectory:
        """Image-to-video's steps 1 and 2: frame 1's latents x_0 (b, c, h, w) DDIM-inverted (`ddim_invert`) with
        the prompts up to T₁, keeping x_{T₀}¹ on the way: the trajectory step 2 would have reached, from the
        picture instead of from noise. Guidance ≤ 1 inverts with the text branch alone."""
        T1, T0 = motion_timesteps(scheduler.timesteps, t0, t1)
        if guidance_scale <= 1.0:
            text = replace(text, uncond=None, uncond_pooled=None)  # the text branch alone
        inverted = ddim_invert(self.sd, x_0, text.context, scheduler, scheduler.inversion_timesteps(up_to=T1),
                               guidance_scale, added_cond=text.added_cond(time_ids), progress=progress,
                               desc="DDIM inversion (frame 1, 0→T1)")
        return FirstFrameTrajectory(x_T1=inverted.at(T1), x_T0=inverted.at(T0), T1=T1, T0=T0)

    @staticmethod
    def warp_first_frame(x_T0: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """Step 3: x̃_{T₀}ᵏ = W_k(x_{T₀}¹) for the later frames k = 2..m: x_T0 (b, c, h, w) and every frame's motion
        (path (f, 2, 3), frame 1 unmoved) → ((b (f−1)), c, h, w), video-major."""
        b, f = x_T0.shape[0], path.shape[0]
        if f == 1:
            return x_T0[:0]
        return warp_latents(repeat(x_T0, "b c h w -> (b f) c h w", f=f - 1), path[1:].repeat(b, 1, 1))

    @staticmethod
    def noise_to_T1(trajectory: FirstFrameTrajectory, warped: torch.Tensor, generator, marginal: str) -> torch.Tensor:
        """Step 4: the warped later frames noised forward from T₀ to T₁ (`ddpm_forward`), after x_{T₁}¹: the video's
        latents at T₁, (b, c, f, h, w)."""
        first = trajectory.x_T1[:, :, None]
        if warped.shape[0] == 0:  # a one-frame video: nothing to warp
            return first
        later = ddpm_forward(warped, trajectory.T0, trajectory.T1, generator, marginal)
        return torch.cat([first, unfold_frames(later, warped.shape[0] // first.shape[0])], dim=2)

    def independent_frames(self, x_T: torch.Tensor, f: int, generator) -> torch.Tensor:
        """The ablation without motion dynamics: x_T¹ (b, c, h, w) and a fresh x_T for each later frame, drawn
        after it → (b, c, f, h, w)."""
        if f == 1:
            return x_T[:, :, None]
        later = draw_noise((x_T.shape[0] * (f - 1), *x_T.shape[1:]), generator, x_T.device, x_T.dtype)
        return torch.cat([x_T[:, :, None], unfold_frames(later, f - 1)], dim=2)

    def denoise_frames(self, x_T1: torch.Tensor, scheduler, timesteps, context, guidance_scale, generator,
                       cross_frame: str, progress: bool, step_callback=None,
                       cross_frame_levels: Sequence[int] | None = None, chunk_size: int | None = None,
                       cache: tuple[int, int] | None = None, merging=None, added_cond=None) -> torch.Tensor:
        """Step 5: DDIM from T₁ to 0 on all frames with cross-frame attention, the UNet seeing at most `chunk_size`
        frames of each video at a time: (b, c, f, h, w) at T₁ → ((b f), c, h, w) at 0. The latents were warped and
        re-noised outside the UNet, so feature caching (`cache`) starts afresh here, on a full pass."""
        f = x_T1.shape[2]  # the f frames of a video share its text context: one row per video, not per frame
        attention = CrossFrame(f, cross_frame, cross_frame_levels)
        return ddim_denoise(self.sd, fold_frames(x_T1), scheduler, timesteps, context, guidance_scale, generator,
                            attention, step_callback, "DDIM (all frames)", progress, chunk_size, cache, merging,
                            added_cond)

    # ----------------------------------------------------------------------------------- background smoothing
    def background_smoothing(self, x_T1: torch.Tensor, path: torch.Tensor, o: VideoOptions, text: TextConditioning,
                             denoise: dict, tracer: Tracer | None = None):
        """Sec. 3.3's optional smoothing: (x_T1, blend). The authors' form blends x_T1 once here; the paper's
        returns `blend(ids)`, a DDIM step callback for the chunk of frames `ids`. (x_T1, None) when off. A
        `tracer` records the masks and one blend (`trace.py`)."""
        if not o.smooth_bg:
            return x_T1, None
        b, _, f, h, w = x_T1.shape
        if o.masks is not None:
            foreground = resize_masks(o.masks.reshape(b, f, *o.masks.shape[-2:]), (h, w)).to(self.sd.device)
        else:
            positions = [token_positions(self.sd.tokenizer, p, o.mask_tokens) for p in text.prompts]
            foreground = self.attention_masks(x_T1, positions, denoise)
        if tracer is not None:
            tracer.smoothing_masks(foreground)
        if o.smoothing == "authors":
            smoothed = smooth_video(x_T1, foreground, path, o.alpha, form="authors")
            if tracer is not None:
                tracer.smoothing_blend(x_T1, smoothed, path, int(denoise["timesteps"][0]))
            return smoothed, None
        blend = self.per_step_smoothing(foreground, path, o.alpha, f)
        if tracer is not None:
            blend = tracer.watched_blend(blend, path, int(denoise["timesteps"][-1]))
        return x_T1, blend

    def attention_masks(self, x_T1, positions, denoise) -> torch.Tensor:
        """Foreground masks (b, f, h, w) from a denoising pass that records cross-attention to the subject tokens,
        chunk by chunk as the video pass runs (one recorder per chunk, each over all the steps). The pass runs
        without the fast modes: its maps need every token at every step."""
        b, _, f, h, w = x_T1.shape
        recorders: dict[tuple[int, ...], CrossAttentionMaps] = {}
        attention = CrossFrame(f, denoise["cross_frame"], denoise["cross_frame_levels"])

        def predict_chunk(x: torch.Tensor, t: torch.Tensor, ids: list[int], frames: CrossFrame) -> torch.Tensor:
            n = b * len(ids)
            rows = slice(n, 2 * n) if denoise["guidance_scale"] > 1.0 else slice(0, n)  # the text branch's
            recorder = recorders.setdefault(tuple(ids), CrossAttentionMaps(
                self.sd.unet, [pos for pos in positions for _ in ids], (h, w), rows))
            with recorder:
                return guided_eps(self.sd.unet, x, t, denoise["context"], denoise["guidance_scale"],
                                  cross_frame=frames, added_cond=denoise["added_cond"])
        ddim_loop(fold_frames(x_T1), denoise["scheduler"], denoise["timesteps"],
                  eps_by_chunks(predict_chunk, attention, denoise["chunk_size"]), denoise["generator"],
                  desc="DDIM (attention masks)", progress=denoise["progress"])
        foreground = torch.zeros(b, f, h, w, device=x_T1.device)
        for ids, recorder in recorders.items():
            foreground[:, list(ids)] = masks_from_maps(rearrange(recorder.mean(), "(b f) h w -> b f h w", b=b))
        return foreground

    @staticmethod
    def per_step_smoothing(foreground, path, alpha: float, f: int):
        """The paper's per-step blend as a DDIM step callback on ((b f), c, h, w) latents."""
        def blend(t: int, x: torch.Tensor) -> torch.Tensor:
            return fold_frames(smooth_video(unfold_frames(x, f), foreground, path, alpha, form="paper"))
        return blend
