"""The KL autoencoder of Stable Diffusion 1.5: encoder → diagonal Gaussian → decoder.

Attribute names are the diffusers SD 1.5 checkpoint keys. `encode`/`decode` work on *unscaled* latents; the
pipelines multiply by `scaling_factor` (0.18215) themselves.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
