"""The SD 1.5 noise schedule and the one way t2vz draws Gaussian noise.

β_t = (linspace(√β_start, √β_end, T))², α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s (Ho et al. 2020, Sec. 2; the
"scaled_linear" schedule of latent diffusion). Computed in float32 in the same order as diffusers, so the
tensors are bitwise equal to `DDIMScheduler.alphas_cumprod`.
"""
from __future__ import annotations

import torch


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas, alphas_cumprod), float32 (T,) each: β = linspace(√β_start, √β_end)², ᾱ = cumprod(1−β)."""
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r}: expected an int ≥ 1 (SD 1.5: 1000)")
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(
            f"beta_start={beta_start!r}, beta_end={beta_end!r}: both must lie in (0, 1) (SD 1.5: 0.00085, 0.012)"
        )
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    alphas = 1.0 - betas
    return betas, alphas, torch.cumprod(alphas, dim=0)


def draw_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ε ~ N(0, I) of `shape`, drawn like diffusers' `randn_tensor`: a CPU generator draws on the CPU, then moves.

    This keeps seeds portable: the same CPU generator gives the same noise whatever device the latents live on.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_device = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(
                f"generator on {generator.device} cannot draw a tensor for {device}; "
                "use a CPU generator or one on the tensor's device"
            )
        draw_device = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
