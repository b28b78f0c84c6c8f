"""Samplers as pure tensor math: no model inside, device and dtype from the inputs, noise from a torch.Generator."""
from .ddim import DDIM
from .ddpm import DDPM
from .noise_schedule import draw_noise, scaled_linear_alphas_cumprod

__all__ = ["DDIM", "DDPM", "draw_noise", "scaled_linear_alphas_cumprod"]
