"""The KL autoencoder of Stable Diffusion 1.5: encoder → diagonal Gaussian → decoder.

Attribute names are the diffusers SD 1.5 checkpoint keys. `encode`/`decode` work on *unscaled* latents; the
pipelines multiply by `scaling_factor` (0.18215) themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


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


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the h·w positions with a residual (the VAE's mid-block attention).

    (b, c, h, w) → (b, c, h, w). The checkpoints' 1×1 convs q, k, v, proj_out are stored as linear layers.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        # contiguous: the rearranged view has channels-last strides, which send the next GroupNorm and conv down
        # other CPU kernels (measured: up to 1.9e-5 off diffusers on the full SD 1.5 decoder instead of 0).
        out = rearrange(self.to_out[0](out), "b (h w) c -> b c h w", h=h, w=w).contiguous()
        return out + x


class VAEMidBlock(nn.Module):
    """resnet → attention → resnet at the lowest resolution."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c, c, None, groups, eps=1e-6) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, groups, eps=1e-6) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(c_out, asymmetric=True)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, groups, eps=1e-6) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """(b, 3, H, W) → (b, 2·latent, H/8, W/8): the mean and log-variance of the posterior."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block, groups, downsample=i < len(ch) - 1)
            for i, c in enumerate(ch)
        )
        self.mid_block = VAEMidBlock(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(b, latent, h, w) → (b, 3, 8h, 8w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], groups)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i, c in enumerate(ch)
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) with log-variance clamped to [−30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std · ε, ε drawn on the generator's device (CPU generators give device-independent draws)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis: 8 for SD 1.5."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (b, 3, H, W) in [−1, 1] → q(z | x) over latents (b, 4, H/8, W/8)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images.to(self.quant_conv.weight.dtype))))

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False):
        """images (b, 3, H, W) in [−1, 1] → unscaled latents (b, 4, H/8, W/8): the posterior's mode, or a sample
        drawn with `generator` when `sample=True`. Multiply by `config.scaling_factor` for the diffusion model."""
        posterior = self.posterior(images)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """unscaled latents (b, 4, h, w), any float dtype → images (b, 3, 8h, 8w) in the VAE's dtype, nominally in
        [−1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latents.to(self.post_quant_conv.weight.dtype)))
