"""Text2Video-Zero (Khachatryan et al., ICCV 2023): text-to-video with a text-to-image model and no training.

Algorithm 1 of the paper, one named function per step (see ../shared/METHOD.md):
  1. `draw_first_frame_noise`    x_T¹ ~ N(0, I)
  2. `ddim_denoise`              DDIM on frame 1 from T to T₁, then on to T₀             (DDIM Eq. 12)
  3. `motion_path` + `warp_latents`  x̃_{T₀}ᵏ = W_k(x_{T₀}¹), δᵏ = λ·(k−1)·δ                (Sec. 3.3)
  4. `ddpm_forward`              x_{T₁}ᵏ ~ q(x_{T₁} | x̃_{T₀}ᵏ) for k = 2..m               (DDPM Eq. 4)
  5. `ddim_denoise` with `CrossFrame`  DDIM from T₁ to 0 on all frames, cross-frame attention (Eq. 8)
  6. `decode_video`              VAE decode of every frame, [−1, 1] → [0, 1]
Optional background smoothing (Sec. 3.3) lives in `smoothing.py`; long videos are denoised in chunks (`chunks`).

Layouts: a video's latents are (b, c, f, h, w); the UNet sees frames folded into the batch, (b f) c h w, by
`fold_frames` / `unfold_frames`. With classifier-free guidance the UNet batch is [uncond videos; text videos].
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat

from .attention import CROSS_FRAME_MODES, CrossFrame, check_cross_frame_levels
from .loading import StableDiffusion, load
from .motion import translation_path, warp_latents
from .schedulers import DDIM, DDPM, draw_noise
from .smoothing import (
    SMOOTHING_FORMS, CrossAttentionMaps, masks_from_maps, resize_masks, smooth_video, token_positions,
)
from .text_to_image import (
    check_size, checked_latents, ddim_denoise, decode_images, encode_prompts, step_counter,
)

DDPM_MARGINALS = ("exact", "reference")


def fold_frames(video: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) → ((b f), c, h, w): frames into the batch, video-major."""
    return rearrange(video, "b c f h w -> (b f) c h w")


def unfold_frames(frames: torch.Tensor, f: int) -> torch.Tensor:
    """((b f), c, h, w) → (b, c, f, h, w)."""
    return rearrange(frames, "(b f) c h w -> b c f h w", f=f)


def video_prompts(prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None,
                  num_videos_per_prompt: int) -> tuple[list[str], list[str] | None]:
    """The prompt and negative prompt of every video, prompt-major: each of the prompts repeated
    `num_videos_per_prompt` times (a single negative prompt serves every prompt). Checked: ValueError naming the
    bad value."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = None
    if negative_prompt is not None:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompts!r}")
    if negatives is not None and len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    if int(num_videos_per_prompt) != num_videos_per_prompt or num_videos_per_prompt < 1:
        raise ValueError(f"num_videos_per_prompt={num_videos_per_prompt} must be an integer >= 1")
    prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
    return prompts, None if negatives is None else [p for p in negatives for _ in range(num_videos_per_prompt)]


def check_chunking(chunk_size: int | None, cross_frame: str, num_frames: int) -> None:
    """Chunks (`TextToVideoZero.chunks`) need chunk_size ≥ 2 (frame 1 plus new frames), and a cross-frame mode in
    which a frame depends on frame 1 and itself only."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 2:
        raise ValueError(f"chunk_size={chunk_size} must be an integer >= 2 (frame 1 plus new frames)")
    if cross_frame == "first+previous" and chunk_size < num_frames:
        raise ValueError("chunked generation needs cross_frame 'first' or 'off': with 'first+previous' every frame "
                         "depends on the one before, across chunk borders")


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
                f"timestep list and must lie in 0..{n - 1} (the paper's t0=44, t1=47 need at least 48 steps)"
            )
    if t0 > t1:
        raise ValueError(f"t0={t0} must not exceed t1={t1} (Δt = t1 − t0 DDIM steps; 0 warps at T₁ itself)")
    return int(timesteps[-t1 - 1]), int(timesteps[-t0 - 1])


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


def decode_video(sd: StableDiffusion, latents: torch.Tensor, f: int) -> torch.Tensor:
    """Step 6: scaled latents ((b f), c, h, w) → frames (b, f, H, W, 3) in [0, 1], decoded one frame at a time
    so that memory does not grow with the video's length."""
    images = torch.cat([decode_images(sd, x[None]) for x in latents])
    return rearrange(images, "(b f) c h w -> b f h w c", f=f).float().cpu()


@dataclass
class FirstFrameTrajectory:
    """The first frame's DDIM trajectory: its latents at T₁ and T₀, (b, c, h, w) each."""

    x_T1: torch.Tensor
    x_T0: torch.Tensor
    T1: int
    T0: int


class TextToVideoZero:
    """`pipe = TextToVideoZero.from_pretrained(path)`; `frames = pipe("a horse galloping on the street")`."""

    def __init__(self, components: StableDiffusion):
        self.sd = components

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32) -> "TextToVideoZero":
        return cls(load(path, device=device, dtype=dtype))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_frames: int = 8,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | Sequence[str] | None = None,
        motion_strength: float | None = None,
        direction: Sequence[float] = (1.0, 1.0),
        t0: int | None = None,
        t1: int | None = None,
        cross_frame: str = "first",
        cross_frame_levels: Sequence[int] | None = None,
        smooth_bg: bool = False,
        alpha: float = 0.6,
        ddpm_marginal: str = "exact",
        smoothing: str = "paper",
        masks: torch.Tensor | None = None,
        mask_tokens: str | None = None,
        motion: Callable[[Sequence[int]], torch.Tensor] | None = None,
        motion_dynamics: bool = True,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        chunk_size: int | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Generate videos: frames (F, H, W, 3) float in [0, 1] for one prompt and one video, else (B, F, H, W, 3)
        with B = prompts × videos per prompt (prompt-major).

        height, width default to the model's own size (`sd.sample_size`: 512 for SD 1.5, 64 for toyworld).
        motion_strength λ is in pixels of a 512×512 reference grid (both references' convention); direction δ is
        (δx, δy); t0 ≤ t1 count DDIM steps from the end (Δt = t1 − t0). λ, t0 and t1 left None are the model's own
        (`sd.method_defaults`): the paper's 12, 44 and 47 unless its folder sets others (toyworld: 32, 15, 15).
        `latents` (B, 4, H/8, W/8) replaces the drawn x_T¹. `callback(i, t, x)` sees the latents after every DDIM
        step. `chunk_size` bounds memory for long videos: frames are denoised in chunks of at most chunk_size
        frames, each with frame 1 prepended; with η = 0 and cross_frame "first" or "off" the result equals
        unchunked generation. `cross_frame_levels` (an ablation; None, every level, is the paper) limits
        cross-frame attention to those UNet levels, 0 the full latent resolution (`attention.CrossFrame`).

        `motion_dynamics=False` is the paper's ablation without Sec. 3.2: every frame starts from its own x_T and
        all frames are denoised from T together (with cross-frame attention unless cross_frame="off").
        `motion(frame_ids) -> (f, 2, 3)` replaces the translation by any path of `t2vz.motion` (zoom, rotation,
        offsets). `smooth_bg` blends each frame's background towards the warped first frame with weight `alpha`,
        every step (`smoothing="paper"`) or once at T₁ (`"authors"`); the foreground comes from `masks`
        (F, H, W) or (B, F, H, W) in [0, 1], or else from the UNet's cross-attention to `mask_tokens` (words of
        the prompt; all of its words when None), recorded in an extra denoising pass.
        """
        prompts, negatives = video_prompts(prompt, negative_prompt, num_videos_per_prompt)
        height, width = self.sd.image_size(height, width)
        own = self.sd.method_defaults  # λ, t0, t1 not given: the model's own
        motion_strength, t0, t1 = (own[k] if v is None else v
                                   for k, v in (("motion_strength", motion_strength), ("t0", t0), ("t1", t1)))
        self.check_inputs(num_frames, height, width, motion_strength, direction, cross_frame, ddpm_marginal,
                          chunk_size, cross_frame_levels)
        if smooth_bg and (smoothing not in SMOOTHING_FORMS or not 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"smoothing={smoothing!r} must be one of {SMOOTHING_FORMS} and alpha={alpha} in [0, 1]")
        sd, f = self.sd, int(num_frames)
        b, factor = len(prompts), sd.vae.downsample_factor
        scheduler = DDIM(num_inference_steps, eta=eta)
        motion_timesteps(scheduler.timesteps, t0, t1)  # validate t0, t1 before any work
        context = encode_prompts(sd, prompts, negatives, guidance_scale)

        shape = (b, sd.unet.config.in_channels, height // factor, width // factor)
        x_T = (draw_first_frame_noise(shape, generator, sd.device, sd.dtype) if latents is None
               else checked_latents(sd, latents, shape))

        on_step = step_counter(callback)

        path = (motion or (lambda ids: motion_path(ids, motion_strength, direction)))(list(range(f)))
        if tuple(path.shape) != (f, 2, 3):
            raise ValueError(f"motion(frame_ids) returned shape {tuple(path.shape)}, expected ({f}, 2, 3)")
        if motion_dynamics:
            trajectory = self.first_frame_trajectory(x_T, scheduler, t0, t1, context, guidance_scale, generator,
                                                     on_step, progress)
            x_T1 = self.motion_dynamics(trajectory, path, generator, ddpm_marginal)
            start = scheduler.timesteps[-t1 - 1 :]
        else:  # ablation: independent x_T per frame, all denoised from T
            later = draw_noise((b * (f - 1), *shape[1:]), generator, sd.device, sd.dtype)
            x_T1 = torch.cat([x_T[:, :, None], unfold_frames(later, f - 1)], dim=2) if f > 1 else x_T[:, :, None]
            start = scheduler.timesteps
        chunks = self.chunks(f, chunk_size)
        denoise = dict(scheduler=scheduler, timesteps=start, context=context,
                       guidance_scale=guidance_scale, generator=generator, cross_frame=cross_frame,
                       cross_frame_levels=cross_frame_levels, progress=progress)
        foreground = None
        if smooth_bg:
            h, w = shape[-2:]
            if masks is not None:
                foreground = resize_masks(masks.reshape(b, f, *masks.shape[-2:]), (h, w)).to(sd.device)
            else:
                positions = [token_positions(sd.tokenizer, p, mask_tokens) for p in prompts]
                foreground = self.attention_masks(x_T1, chunks, positions, denoise)
            if smoothing == "authors":
                x_T1 = smooth_video(x_T1, foreground, path, alpha, form="authors")

        out = []
        for i, ids in enumerate(chunks):
            blend = None
            if smooth_bg and smoothing == "paper":
                blend = self.per_step_smoothing(foreground[:, ids], path[ids], alpha, len(ids))
            x = self.denoise_frames(x_T1[:, :, ids], **denoise, step_callback=self.chain(blend, on_step))
            frames = decode_video(sd, x, len(ids))
            out.append(frames if i == 0 else frames[:, 1:])  # drop frame 1, prepended to every later chunk
        video = torch.cat(out, dim=1)
        return video[0] if video.shape[0] == 1 else video

    def denoise_frames(self, x_T1: torch.Tensor, scheduler, timesteps, context, guidance_scale, generator,
                       cross_frame: str, progress: bool, step_callback=None,
                       cross_frame_levels: Sequence[int] | None = None) -> torch.Tensor:
        """Step 5: DDIM from T₁ to 0 on all frames of a chunk with cross-frame attention: (b, c, f, h, w) at T₁ →
        ((b f), c, h, w) at 0."""
        f = x_T1.shape[2]  # the f frames of a video share its text context: one row per video, not per frame
        attention = CrossFrame(f, cross_frame, cross_frame_levels)
        return ddim_denoise(self.sd, fold_frames(x_T1), scheduler, timesteps, context, guidance_scale, generator,
                            attention, step_callback, "DDIM (all frames)", progress)

    def attention_masks(self, x_T1, chunks, positions, denoise) -> torch.Tensor:
        """Foreground masks (b, f, h, w) from a denoising pass that records cross-attention to the subject tokens."""
        b, _, f, h, w = x_T1.shape
        foreground = torch.zeros(b, f, h, w, device=x_T1.device)
        for ids in chunks:
            n = b * len(ids)
            rows = slice(n, 2 * n) if denoise["guidance_scale"] > 1.0 else slice(0, n)
            row_positions = [pos for pos in positions for _ in ids]
            with CrossAttentionMaps(self.sd.unet, row_positions, (h, w), rows) as maps:
                self.denoise_frames(x_T1[:, :, ids], **denoise)
            foreground[:, ids] = masks_from_maps(rearrange(maps.mean(), "(b f) h w -> b f h w", b=b))
        return foreground

    @staticmethod
    def per_step_smoothing(foreground, path, alpha: float, f: int):
        """The paper's per-step blend as a DDIM step callback on ((b f), c, h, w) latents."""
        def blend(t: int, x: torch.Tensor) -> torch.Tensor:
            return fold_frames(smooth_video(unfold_frames(x, f), foreground, path, alpha, form="paper"))
        return blend

    @staticmethod
    def chain(*callbacks):
        """One step callback from several: each may replace x, later ones see the replacement."""
        callbacks = [c for c in callbacks if c is not None]

        def run(t: int, x: torch.Tensor) -> torch.Tensor:
            for callback in callbacks:
                replaced = callback(t, x)
                x = x if replaced is None else replaced
            return x
        return run if callbacks else None

    # ---------------------------------------------------------------------------------------------- the steps
    def first_frame_trajectory(self, x_T, scheduler, t0, t1, context, guidance_scale, generator, callback,
                               progress) -> FirstFrameTrajectory:
        """Steps 1–2: DDIM on frame 1 alone, T → T₁ (keep x_{T₁}¹), then T₁ → T₀ (keep x_{T₀}¹)."""
        T1, T0 = motion_timesteps(scheduler.timesteps, t0, t1)
        ts = scheduler.timesteps
        x_T1 = ddim_denoise(self.sd, x_T, scheduler, ts[: -t1 - 1], context, guidance_scale, generator,
                            step_callback=callback, desc="DDIM (frame 1, T→T1)", progress=progress)
        x_T0 = ddim_denoise(self.sd, x_T1, scheduler, ts[-t1 - 1 : -t0 - 1], context, guidance_scale, generator,
                            step_callback=callback, desc="DDIM (frame 1, T1→T0)", progress=progress)
        return FirstFrameTrajectory(x_T1=x_T1, x_T0=x_T0, T1=T1, T0=T0)

    def motion_dynamics(self, trajectory: FirstFrameTrajectory, path: torch.Tensor, generator,
                        marginal: str) -> torch.Tensor:
        """Steps 3–4: warp x_{T₀}¹ by each later frame's motion (path (f, 2, 3), frame 1 unmoved), noise the warped
        latents forward to T₁, stack after x_{T₁}¹. Returns video latents at T₁, (b, c, f, h, w)."""
        b, f = trajectory.x_T0.shape[0], path.shape[0]
        if f == 1:
            return trajectory.x_T1[:, :, None]
        x0 = repeat(trajectory.x_T0, "b c h w -> (b f) c h w", f=f - 1)
        warped = warp_latents(x0, path[1:].repeat(b, 1, 1))
        x_T1_later = unfold_frames(ddpm_forward(warped, trajectory.T0, trajectory.T1, generator, marginal), f - 1)
        return torch.cat([trajectory.x_T1[:, :, None], x_T1_later], dim=2)

    @staticmethod
    def chunks(f: int, chunk_size: int | None) -> list[list[int]]:
        """Frame ids per denoising chunk: all at once, or [0] + up to chunk_size − 1 new frames per chunk."""
        if chunk_size is None or chunk_size >= f:
            return [list(range(f))]
        new = list(range(1, f))
        return [list(range(chunk_size))] + [
            [0] + new[i : i + chunk_size - 1] for i in range(chunk_size - 1, len(new), chunk_size - 1)
        ]

    def check_inputs(self, num_frames, height, width, motion_strength, direction, cross_frame, ddpm_marginal,
                     chunk_size, cross_frame_levels=None) -> None:
        if isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be an integer >= 1")
        check_size(height, width, self.sd.vae.downsample_factor)
        if not math.isfinite(float(motion_strength)):
            raise ValueError(f"motion_strength (λ) must be a finite number, got {motion_strength}")
        if len(direction) != 2 or not all(math.isfinite(float(d)) for d in direction):
            raise ValueError(f"direction must be two finite numbers (δx, δy), got {tuple(direction)}")
        if cross_frame not in CROSS_FRAME_MODES:
            raise ValueError(f"cross_frame={cross_frame!r} is not one of {CROSS_FRAME_MODES}")
        if ddpm_marginal not in DDPM_MARGINALS:
            raise ValueError(f"ddpm_marginal={ddpm_marginal!r} is not one of {DDPM_MARGINALS}")
        check_chunking(chunk_size, cross_frame, num_frames)
        check_cross_frame_levels(cross_frame_levels, cross_frame, self.sd.unet.config.attention_levels)
