"""ControlNet for the SD 1.5 UNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of the UNet's encoder, fed the noisy latent plus an embedded control image (edges, depth,
pose, ...), whose features reach the locked UNet through zero convolutions added to its skips and mid-block output.

Attribute names are diffusers' `ControlNetModel` state-dict keys (`controlnet_cond_embedding.blocks.0`,
`controlnet_down_blocks.3`, `controlnet_mid_block`, and the UNet's own `down_blocks.*` / `mid_block.*`), so a
converted SD 1.5 ControlNet checkpoint loads with `strict=True`.

Axis letters: b batch, c channels, h w latent spatial, H W pixel spatial (H = 8h, W = 8w).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossFrame
from .tome import TokenMerging
from .unet import UNetConfig, add_encoder, check_context_rows, embed_time, run_encoder


@dataclass
class ControlNetConfig(UNetConfig):
    """SD 1.5 defaults. The encoder fields are `UNetConfig`'s (a ControlNet copies its UNet's encoder, so they must
    equal that UNet's; `out_channels` is unused); `conditioning_embedding_out_channels` are the widths of the
    control-image embedding E(·)."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self):
        super().__post_init__()
        self.conditioning_embedding_out_channels = tuple(self.conditioning_embedding_out_channels)
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels needs at least one width")

    @classmethod
    def from_unet(cls, unet_config: UNetConfig, **kwargs) -> ControlNetConfig:
        """The ControlNet config matching `unet_config`'s encoder (`kwargs` set the conditioning fields)."""
        return cls(**{**asdict(unet_config), **kwargs})

    @property
    def control_downscale(self) -> int:
        """Pixels per latent pixel the control image must have: 2 per stride-2 conv of E(·), 8 for SD 1.5."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ControlNetConditioningEmbedding(nn.Module):
    """E(·): the control image c_i (b, 3, H, W) → c_f (b, c0, h, w), c_f = E(c_i), the "tiny network" of
    Zhang et al. Sec. 3.2.

    The paper describes four 4×4 stride-2 convs with ReLU; the released SD 1.5 ControlNets (and diffusers) use
    3×3 conv → SiLU, then per width pair a 3×3 conv → SiLU → 3×3 stride-2 conv → SiLU, then a zero-initialised
    3×3 `conv_out` to the UNet's first width c0. With the default widths (16, 32, 96, 256) that is 8× downscaling.
    """

    def __init__(self, out_channels: int, conditioning_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)  # keys blocks.0 .. blocks.{2·(len(widths)−1)−1}, as in diffusers
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # zero-initialised: an untrained ControlNet leaves the UNet unchanged
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(control))  # (b, w0, H, W)
        for conv in self.blocks:
            x = F.silu(conv(x))  # every second conv halves H, W
        return self.conv_out(x)  # (b, c0, h, w)


def zero_conv(channels: int) -> nn.Conv2d:
    """Z(·; Θ_z): a 1×1 conv with weight and bias initialised to zero (Zhang et al. Sec. 3.1)."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    """The trainable copy of the UNet encoder, F(·; Θ_c), with its zero convolutions (Zhang et al. Eq. 2):

        y_c = F(x; Θ) + Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2)

    applied to SD 1.5 as in Sec. 3.2: x is the output of the UNet's `conv_in` on the noisy latent, the control enters
    through E(·) (whose zero-initialised `conv_out` plays Z(·; Θ_z1)), and one Z(·; Θ_z2) per encoder skip
    (`controlnet_down_blocks.N`) and one on the mid-block output (`controlnet_mid_block`) give the residuals the
    locked UNet adds to its skips and mid-block output (`UNet.forward(down_residuals=..., mid_residual=...)`).
    """

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = cfg = config
        channels = cfg.block_out_channels
        skip_channels = add_encoder(self, cfg)  # conv_in, time_embedding, down_blocks, mid_block: the UNet's
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels
        )
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(c) for c in skip_channels)
        self.controlnet_mid_block = zero_conv(channels[-1])

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int | float,
        context: torch.Tensor,
        control: torch.Tensor,
        conditioning_scale: float = 1.0,
        cross_frame: CrossFrame | None = None,
        merging: TokenMerging | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (n, c_in, h, w) noisy latents, t (n,) or a scalar, context (n, 77, 768), control (n or 1, 3, 8h, 8w)
        in [0, 1] → (down residuals, one per UNet skip: (n, c_level, h_level, w_level); mid residual
        (n, c_last, h_last, w_last)), each multiplied by `conditioning_scale`.

        `cross_frame` and a `context` with one row per video are as in `UNet.forward`: every `attn1` of the copied
        encoder becomes cross-frame attention (T2V-Zero Eq. 8), and the text keys and values are projected once per
        video. `merging` (token merging, `sd.tome`) acts in the copied encoder as in `UNet.forward`; tomesd patches
        only the UNet, so a run that reproduces it leaves this None. `added_cond`: SDXL's pooled text embedding
        and size/crop conditioning, as in `UNet.forward` (required where the config's addition_embed_type is
        "text_time", refused otherwise).
        """
        n, _, h, w = x.shape
        check_context_rows(n, context)
        s = self.config.control_downscale
        if tuple(control.shape[-2:]) != (s * h, s * w):
            raise ValueError(
                f"control image is {control.shape[-2]}×{control.shape[-1]} px for a {h}×{w} latent: it must be "
                f"{s}× the latent size, {s * h}×{s * w} px"
            )
        if control.shape[0] not in (1, n):
            raise ValueError(f"control has {control.shape[0]} images for a batch of {n}: it needs 1 or {n}")
        temb = embed_time(self, t, x, added_cond)

        x = self.conv_in(x) + self.controlnet_cond_embedding(control.to(x.dtype))  # x + Z(c; Θ_z1)
        x, skips = run_encoder(self, x, temb, context, cross_frame, merging)

        down = [zero(skip) * conditioning_scale for zero, skip in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(x) * conditioning_scale
