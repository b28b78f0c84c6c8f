"""DDIM inversion: the deterministic DDIM update run backwards, x₀ → x_T, so that a given image or video becomes the
latents that regenerate it (Song et al. 2021, Sec. 4.3; docs/method.md, "DDIM inversion").

    inverted = ddim_invert(sd, x0, context, DDIM(50))       # x0: scaled VAE latents ((b f), c, h, w)
    inverted.final                                          # x at timestep 981, where sampling starts
    inverted.at(941)                                        # x at any inverted timestep

Each step evaluates the noise prediction at the timestep it goes to, on the latent it comes from, ε̂(x_{t_prev}, t)
(`DDIM.inverse_step`): x_t is not known before the step, and DDIM's path is nearly straight, so the two are close.
That approximation, classifier-free guidance (a guidance scale > 1 bends the sampling path away from the
inverted one), and the VAE's own round trip are what keep a regeneration from equalling its source exactly.

Used by image-to-video (`TextToVideoZero(..., image=...)`: frame 1's trajectory from a picture) and by
Tune-A-Video's editing (`tune_a_video.py`: a source video inverted with the tuned model).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..sd.attention import CrossFrame
from ..sd.loading import StableDiffusion
from ..sd.schedulers import DDIM
from .sampling import guided_eps


@dataclass
class Inversion:
    """The inverted trajectory: `timesteps` ascending (n,), and `latents`, n + 1 tensors: latents[0] is the x₀
    that was inverted, latents[i + 1] the latent at timesteps[i]."""

    timesteps: torch.Tensor
    latents: list[torch.Tensor]

    @property
    def final(self) -> torch.Tensor:
        """The latent at the largest inverted timestep (x₀ itself when no step ran)."""
        return self.latents[-1]

    def at(self, t: int | torch.Tensor) -> torch.Tensor:
        """The latent at inverted timestep t; ValueError naming t and the inverted timesteps otherwise."""
        hits = (self.timesteps == int(t)).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {int(t)} was not inverted to; the inverted timesteps are "
                             f"{self.timesteps.tolist()}")
        return self.latents[int(hits[0]) + 1]


def inversion_loop(
    x: torch.Tensor,
    scheduler: DDIM,
    timesteps: torch.Tensor,
    predict_eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    desc: str = "DDIM inversion",
    progress: bool = True,
) -> Inversion:
    """DDIM inversion over ascending `timesteps` with any noise prediction `predict_eps(x, t) -> ε`: x at the
    timestep below timesteps[0] (x₀ for the full list) → every latent on the way (`Inversion`). The twin of
    `sampling.ddim_loop`, timesteps kept on the CPU for the scheduler and copied to x's device once."""
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64).cpu()
    if timesteps.ndim != 1 or (len(timesteps) > 1 and not bool((timesteps[1:] > timesteps[:-1]).all())):
        raise ValueError(f"inversion timesteps must be ascending, got {timesteps.tolist()}")
    on_device = timesteps.to(x.device)
    latents = [x]
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        x, _ = scheduler.inverse_step(predict_eps(x, on_device[i]), t, x)
        latents.append(x)
    return Inversion(timesteps=timesteps, latents=latents)


@torch.no_grad()
def ddim_invert(
    sd: StableDiffusion,
    x0: torch.Tensor,
    context: torch.Tensor,
    scheduler: DDIM,
    timesteps: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    cross_frame: CrossFrame | None = None,
    added_cond: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "DDIM inversion",
) -> Inversion:
    """Invert scaled latents x0 ((b f), c, h, w) with the model's UNet and a text `context`: its rows
    ([uncond; text] with guidance_scale > 1, the text alone otherwise, as `TextConditioning.context`; one row per
    video, shared by its f frames) condition each step, `guided_eps` combines the branches. `timesteps`: ascending
    (`DDIM.inversion_timesteps`; default all of them, x₀ → x at the sampler's first timestep). `cross_frame`: how
    self-attention mixes the frames of a video while inverting it (None: frames independent); `added_cond`: SDXL's
    added conditioning. Guidance 1 (the default) is the usual choice: guidance > 1 bends the trajectory."""
    if timesteps is None:
        timesteps = scheduler.inversion_timesteps()

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(sd.unet, x, t, context, guidance_scale, cross_frame=cross_frame, added_cond=added_cond)
    return inversion_loop(x0.to(device=sd.device, dtype=sd.dtype), scheduler, timesteps, predict, desc, progress)
