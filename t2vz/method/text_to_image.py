"""Text-to-image with Stable Diffusion 1.5: DDIM sampling with classifier-free guidance (`sampling.py`). It
exercises the whole stack end to end; the video pipelines build on the same steps.

Random stream, kept identical to diffusers' StableDiffusionPipeline for seed compatibility: x_T (1, 4, h, w) is the
first draw from `generator`, then DDIM's noise when η > 0.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..sd.loading import StableDiffusion
from ..sd.schedulers import DDIM, draw_noise
from .sampling import check_size, checked_latents, ddim_denoise, decode_images, encode_prompts, step_counter


@torch.no_grad()
def text_to_image(
    components: StableDiffusion,
    prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    negative_prompt: str | None = None,
    eta: float = 0.0,
    latents: torch.Tensor | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    progress: bool = True,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """prompt → image (H, W, 3) float in [0, 1]. `latents` (1, 4, H/8, W/8) scaled, replaces the drawn x_T;
    `callback(i, t, x)` is called after every DDIM step. height, width: None is the model's own size.
    `prompt_embeds` (1, n_tokens, d) replace `prompt` (prompt=None), `negative_prompt_embeds` (same shape) the
    `negative_prompt`, as in diffusers (`sampling.encode_prompts`)."""
    sd = components
    height, width = sd.image_size(height, width)
    factor = sd.vae.downsample_factor
    check_size(height, width, factor)
    scheduler = DDIM(num_inference_steps, eta=eta)
    context = encode_prompts(sd, prompt, negative_prompt or None, guidance_scale > 1.0, prompt_embeds=prompt_embeds,
                             negative_prompt_embeds=negative_prompt_embeds, one_prompt=True).context
    shape = (1, sd.unet.config.in_channels, height // factor, width // factor)
    x = (draw_noise(shape, generator, sd.device, sd.dtype) if latents is None
         else checked_latents(sd, latents, shape, f" for {height}×{width}"))
    on_step = step_counter(callback)
    x = ddim_denoise(sd, x, scheduler, scheduler.timesteps, context, guidance_scale, generator,
                     step_callback=on_step, progress=progress)
    return decode_images(sd, x)[0].permute(1, 2, 0).float().cpu()
