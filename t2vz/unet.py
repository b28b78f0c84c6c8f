"""The latent-diffusion UNet of Stable Diffusion 1.5 (Rombach et al. 2022), epsilon-prediction.

Attribute names are the diffusers SD 1.5 checkpoint keys (`down_blocks.0.resnets.0.norm1`, `attn1.to_q`, ...), so a
converted state dict loads with `strict=True`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UNetConfig:
    """SD 1.5 defaults. `attention_levels[i]` says whether resolution level i has transformer blocks."""

    in_channels: int = 4  # 8 for InstructPix2Pix (noisy latent ⊕ source latent), 9 for inpainting
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    num_attention_heads: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError(
                f"attention_levels {self.attention_levels} and block_out_channels {self.block_out_channels} "
                "must have one entry per resolution level"
            )
