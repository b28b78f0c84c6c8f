"""Residual blocks and resamplers shared by the UNet and the VAE (the "ResBlock" of Ho et al. 2020 / ADM).

Axis letters: b batch, c channels, h w spatial.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → conv, plus a (1×1-projected) skip.

    x (b, c_in, h, w), temb (b, c_temb) or None → (b, c_out, h, w). The VAE's blocks have no time embedding.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv: (b, c, h, w) → (b, c, h/2, w/2).

    The UNet pads by 1 on every side; the VAE encoder pads right and bottom only (`asymmetric=True`), as in LDM.
    """

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2 (or to `size`, the matching skip's size when h, w were odd) then a 3×3 conv:
    (b, c, h, w) → (b, c, 2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
