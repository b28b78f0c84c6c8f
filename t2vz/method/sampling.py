"""The sampling loop every pipeline shares: DDIM (Song et al. 2021, Eq. 12) with classifier-free guidance (Ho &
Salimans 2022), and the steps around it (text conditioning, x_T, decoding), as k-diffusion keeps its samplers'
common loop in one place.

Random stream, kept identical to diffusers' pipelines for seed compatibility: x_T is the first draw from
`generator` (a CPU generator draws on the CPU, whatever the device), then DDIM's noise when η > 0.

Layouts: a video's latents are (b, c, f, h, w); the UNet sees frames folded into the batch, (b f) c h w, by
`fold_frames` / `unfold_frames`. With classifier-free guidance the UNet batch is [uncond rows; text rows].
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from einops import rearrange
from tqdm.auto import tqdm

from ..sd.attention import CrossFrame
from ..sd.loading import StableDiffusion
from ..sd.schedulers import DDIM
from ..sd.tome import TokenMerging
from .chunks import eps_by_chunks
from .fast import loop_unet_kwargs


def fold_frames(video: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) → ((b f), c, h, w): frames into the batch, video-major."""
    return rearrange(video, "b c f h w -> (b f) c h w")


def unfold_frames(frames: torch.Tensor, f: int) -> torch.Tensor:
    """((b f), c, h, w) → (b, c, f, h, w)."""
    return rearrange(frames, "(b f) c h w -> b c f h w", f=f)


def check_size(height: int, width: int, multiple: int = 8) -> None:
    """Image sizes must be whole multiples of the VAE's downsampling factor (8 for SD 1.5)."""
    for name, value in (("height", height), ("width", width)):
        if int(value) != value or value <= 0 or value % multiple:
            raise ValueError(
                f"{name}={value} must be a positive multiple of {multiple} (the VAE downsamples by {multiple})"
            )


def encode_prompts(sd: StableDiffusion, prompts: list[str], negative_prompts: list[str] | None,
                   guidance_scale: float) -> torch.Tensor:
    """Text conditioning for CFG: [uncond; text] stacked on the batch axis (b → 2b), or just text when s ≤ 1."""
    text = sd.text_encoder(prompts)
    if guidance_scale <= 1.0:
        return text
    uncond = sd.text_encoder(negative_prompts or [""] * len(prompts))
    return torch.cat([uncond, text])


def guided_eps(unet: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               guidance_scale: float, **unet_kwargs) -> torch.Tensor:
    """ε = ε_uncond + s·(ε_text − ε_uncond), both branches in one batch of `unet` (the UNet, or the UNet driven by
    a ControlNet): x (n, c, h, w) → (n, c, h, w)."""
    if guidance_scale <= 1.0:
        return unet(x, t, context, **unet_kwargs)
    eps_uncond, eps_text = unet(torch.cat([x, x]), t, context, **unet_kwargs).chunk(2)
    return eps_uncond + guidance_scale * (eps_text - eps_uncond)


def checked_latents(sd: StableDiffusion, latents: torch.Tensor, shape: tuple[int, ...], what: str = "") -> torch.Tensor:
    """A caller's x_T: checked against `shape` (ValueError naming both, plus `what`), moved to the model's device
    and dtype."""
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}{what}")
    return latents.to(device=sd.device, dtype=sd.dtype)


def step_counter(callback: Callable[[int, int, torch.Tensor], None] | None):
    """A user's `callback(i, t, x)` as a DDIM step callback `(t, x)`, i counting the steps across every loop it
    is passed to (a pipeline's several phases and chunks); None for None."""
    if callback is None:
        return None
    counter = itertools.count()
    return lambda t, x: callback(next(counter), t, x)


def chain(*callbacks):
    """One step callback `(t, x)` from several (None skipped): each may return a replacement x, later ones see it."""
    callbacks = [c for c in callbacks if c is not None]

    def run(t: int, x: torch.Tensor) -> torch.Tensor:
        for callback in callbacks:
            replaced = callback(t, x)
            x = x if replaced is None else replaced
        return x
    return run if callbacks else None


def ddim_loop(
    x: torch.Tensor,
    scheduler: DDIM,
    timesteps: torch.Tensor,
    predict_eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator | None = None,
    step_callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    desc: str = "DDIM",
    progress: bool = True,
) -> torch.Tensor:
    """DDIM (Eq. 12) over `timesteps` with any noise prediction `predict_eps(x, t) -> ε` (guidance included):
    x at timesteps[0] → x one DDIM step below timesteps[−1]. `step_callback(t, x)` may return a replacement x."""
    for t in tqdm(timesteps, desc=desc, disable=not progress, leave=False):
        eps = predict_eps(x, t.to(x.device))
        x, _ = scheduler.step(eps, t, x, generator=generator)
        replaced = step_callback(int(t), x) if step_callback is not None else None
        x = x if replaced is None else replaced
    return x


def ddim_denoise(
    sd: StableDiffusion,
    x: torch.Tensor,
    scheduler: DDIM,
    timesteps: torch.Tensor,
    context: torch.Tensor,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    cross_frame: CrossFrame | None = None,
    step_callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    desc: str = "DDIM",
    progress: bool = True,
    chunk_size: int | None = None,
    cache: tuple[int, int] | None = None,
    merging: TokenMerging | None = None,
) -> torch.Tensor:
    """DDIM with classifier-free guidance (T2V-Zero steps 2 and 5): x ((b f), c, h, w) at timesteps[0] → x one DDIM
    step below timesteps[−1], f = `cross_frame.num_frames` (1 without). With `chunk_size`, the UNet sees at most
    that many frames of each video at a time (`chunks.eps_by_chunks`).

    `cache` = (interval, branch): DeepCache's feature caching (`sd/deepcache.py`), a full UNet pass every
    `interval` steps of this loop, starting with its first, and branch `branch` alone in between. The caches live
    for this call only (one per chunk, `chunks.chunk_caches`): every loop starts on a full pass. `merging`: token
    merging in the UNet (`sd/tome.py`), one object for the whole generation (it carries the random stream)."""
    unet_kwargs = loop_unet_kwargs(cache, merging)

    def predict_chunk(x: torch.Tensor, t: torch.Tensor, ids: list[int], frames: CrossFrame | None) -> torch.Tensor:
        return guided_eps(sd.unet, x, t, context, guidance_scale, cross_frame=frames, **unet_kwargs(ids))
    return ddim_loop(x, scheduler, timesteps, eps_by_chunks(predict_chunk, cross_frame, chunk_size), generator,
                     step_callback, desc, progress)


def decode_images(sd: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (n, 4, h, w) → images (n, 3, 8h, 8w) in [0, 1]."""
    images = sd.vae.decode(latents / sd.vae.config.scaling_factor)
    return (images / 2 + 0.5).clamp(0, 1)


def decode_video(sd: StableDiffusion, latents: torch.Tensor, f: int) -> torch.Tensor:
    """T2V-Zero step 6: scaled latents ((b f), c, h, w) → frames (b, f, H, W, 3) in [0, 1] on the CPU, decoded one
    frame at a time so that memory does not grow with the video's length."""
    images = torch.cat([decode_images(sd, x[None]) for x in latents])
    return rearrange(images, "(b f) c h w -> b f h w c", f=f).float().cpu()
