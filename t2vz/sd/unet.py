"""The latent-diffusion UNet of Stable Diffusion 1.5 (Rombach et al. 2022) and of Stable Diffusion XL (Podell et
al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis"), epsilon-prediction.

SDXL keeps SD 1.5's architecture and changes its proportions and conditioning (`UNetConfig`):
  - Sec. 2.1, the transformer computation moves to the lower-resolution features: three levels (320, 640, 1280)
    instead of four, no transformer at the full latent resolution (`attention_levels`), 2 and 10 transformer
    blocks per transformer at the other two levels (`transformer_layers_per_block`; the mid block has 10), heads
    of 64 channels (`num_attention_heads` 5, 10, 20 per level), and linear projections on the tokens around each
    transformer (`use_linear_projection`) where SD 1.5 has 1×1 convs;
  - Sec. 2.1, the text context is two text encoders' penultimate features concatenated (2048 wide,
    `cross_attention_dim`), and the pooled text embedding conditions the model through the timestep embedding;
  - Sec. 2.2 (micro-conditioning) and 2.3 (multi-aspect training): the original image size, the crop's top-left
    corner and the target size, six numbers, each embedded with the timestep's sinusoids (Fourier features)
    and, concatenated with the pooled text embedding, mapped by two linear layers into the timestep embedding
    (`TextTimeEmbedding`, diffusers' addition_embed_type "text_time"). `UNet.forward` takes them as `added_cond`.

Attribute names are the diffusers checkpoint keys (`down_blocks.0.resnets.0.norm1`, `attn1.to_q`,
`add_embedding.linear_1`, ...), so a converted SD 1.5 or SDXL state dict loads with `strict=True`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossFrame, Transformer2D, at_level
from .deepcache import FeatureCache, check_branch, skip_count
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .tome import TokenMerging, merging_at


@dataclass
class UNetConfig:
    """SD 1.5 defaults. `attention_levels[i]` says whether resolution level i has transformer blocks.

    SDXL (Podell et al. 2023) differs in: three levels (320, 640, 1280) with no attention at the first,
    `num_attention_heads` (5, 10, 20) and `transformer_layers_per_block` (1, 2, 10) per level (the mid block takes
    the deepest level's), linear instead of 1×1-conv projections around each transformer (`use_linear_projection`),
    a 2048-wide text context, and the "text_time" added embedding (`addition_embed_type`): the pooled text
    embedding and six size/crop numbers, each number a sinusoid of `addition_time_embed_dim` channels, through two
    linear layers into the timestep embedding (`projection_class_embeddings_input_dim` = 1280 + 6·256 inputs)."""

    in_channels: int = 4  # 8 for InstructPix2Pix (noisy latent ⊕ source latent), 9 for inpainting
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    num_attention_heads: int | tuple[int, ...] = 8           # one for all levels, or one per level
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_layers_per_block: int | tuple[int, ...] = 1  # one for all levels, or one per level
    use_linear_projection: bool = False
    addition_embed_type: str | None = None                   # None (SD 1.5) or "text_time" (SDXL)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            raise ValueError(
                f"attention_levels {self.attention_levels} and block_out_channels {self.block_out_channels} "
                "must have one entry per resolution level"
            )
        for name in ("num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int):
                value = tuple(int(v) for v in value)
                if len(value) != levels:
                    raise ValueError(f"{name} {value} must be one number or one per resolution level ({levels})")
                setattr(self, name, value)
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} must be None or 'text_time'")

    def heads_at(self, level: int) -> int:
        """The attention heads of the transformers at resolution `level`."""
        heads = self.num_attention_heads
        return heads if isinstance(heads, int) else heads[level]

    def depth_at(self, level: int) -> int:
        """The transformer blocks in each transformer at resolution `level` (the mid block: the deepest level's)."""
        depth = self.transformer_layers_per_block
        return depth if isinstance(depth, int) else depth[level]


def sinusoidal(t: torch.Tensor, channels: int) -> torch.Tensor:
    """[cos(t·ω_i), sin(t·ω_i)] with ω_i = 10000^(−i/half), i < half = channels // 2 (Vaswani et al. 2017,
    Sec. 3.5; cos first, as in SD): t (b,) → (b, channels), float32."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t (cos first, as in SD) → Linear → SiLU → Linear: t (b,) → (b, 4·c0)."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal(t, self.channels)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(self.sinusoidal(t).to(dtype))))


class TextTimeEmbedding(nn.Module):
    """SDXL's added conditioning (Podell et al. 2023, Sec. 2.2–2.3): the pooled text embedding ⊕ the Fourier features
    of the k size/crop numbers (k = 6: original h, w; crop top, left; target h, w), each number embedded as a
    timestep is, with `time_channels` sinusoids → Linear → SiLU → Linear, into the timestep embedding's width.
    diffusers' `add_time_proj` (the sinusoids, no parameters) and `add_embedding` (keys `linear_1`, `linear_2`).

    text_embeds (r, d_pool), time_ids (r, k) → (r, embed_dim), with d_pool + k·time_channels = `in_dim`."""

    def __init__(self, in_dim: int, embed_dim: int, time_channels: int):
        super().__init__()
        self.time_channels = time_channels
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, text_embeds: torch.Tensor, time_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        r = time_ids.shape[0]
        times = sinusoidal(time_ids.flatten(), self.time_channels).reshape(r, -1)  # (r, k·time_channels)
        features = torch.cat([text_embeds.to(dtype), times.to(dtype)], dim=-1)
        return self.linear_2(F.silu(self.linear_1(features)))


def check_context_rows(n: int, context: torch.Tensor, what: str = "context") -> None:
    """A batch of n rows takes one text context (or added conditioning, `what`) per row, or one per group of
    consecutive rows (one per video)."""
    if n % context.shape[0]:
        raise ValueError(f"{what} has {context.shape[0]} rows for a batch of {n}: it needs one row per batch "
                         "row, or one per group of consecutive rows (the frames of a video)")


ADDED_COND_KEYS = ("text_embeds", "time_ids")


def check_added_cond(cfg: UNetConfig, n: int, added_cond: dict | None) -> None:
    """ValueError unless `added_cond` fits a UNet of `cfg` called on n rows: None where the UNet has no added
    embedding; for SDXL's "text_time", "text_embeds" (r, d_pool) and "time_ids" (r, k) with d_pool + k·
    addition_time_embed_dim = projection_class_embeddings_input_dim and r rows as `context` may have them (one per
    batch row, or one per group of consecutive rows)."""
    if cfg.addition_embed_type is None:
        if added_cond is not None:
            raise ValueError("added_cond was given to a UNet without an added embedding (addition_embed_type=None, "
                             "SD 1.5): pass added_cond=None")
        return
    if added_cond is None or any(key not in added_cond for key in ADDED_COND_KEYS):
        given = None if added_cond is None else sorted(added_cond)
        raise ValueError(f"this UNet (addition_embed_type='text_time', SDXL) needs added_cond with 'text_embeds' "
                         f"(rows, pooled text dim) and 'time_ids' (rows, 6: original size, crop top-left, target "
                         f"size); got {given}")
    text, times = added_cond["text_embeds"], added_cond["time_ids"]
    if text.ndim != 2 or times.ndim != 2 or text.shape[0] != times.shape[0]:
        raise ValueError(f"added_cond text_embeds {tuple(text.shape)} and time_ids {tuple(times.shape)} must be "
                         "2-d with the same number of rows")
    width = text.shape[1] + times.shape[1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
        raise ValueError(f"added_cond gives {text.shape[1]} + {times.shape[1]}·{cfg.addition_time_embed_dim} = "
                         f"{width} features; this UNet's add_embedding takes "
                         f"projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}")
    check_context_rows(n, text, "added_cond")


def embed_time(module: nn.Module, t: torch.Tensor | int | float, x: torch.Tensor,
               added_cond: dict | None = None) -> torch.Tensor:
    """The timestep embedding (n, 4·c0) of an `add_encoder` module for the n rows of x: `time_embedding` of t,
    plus, for SDXL, `add_embedding` of `added_cond` (checked by `check_added_cond`), each of its r rows repeated
    for its n / r consecutive batch rows."""
    n = x.shape[0]
    check_added_cond(module.config, n, added_cond)
    temb = module.time_embedding(timesteps_for(t, n, x.device), x.dtype)
    if added_cond is None:
        return temb
    added = module.add_embedding(added_cond["text_embeds"], added_cond["time_ids"], temb.dtype)  # (r, 4·c0)
    return temb + added.repeat_interleave(n // added.shape[0], dim=0)


def timesteps_for(t: torch.Tensor | int | float, n: int, device: torch.device) -> torch.Tensor:
    """A scalar or (n,) timestep as (n,) on `device`."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t[None]
    return t.expand(n)


def transformer(channels: int, cfg: UNetConfig, level: int) -> Transformer2D:
    """A transformer of resolution `level` (the mid block's: the deepest level): the level's heads and depth, and
    linear or 1×1-conv projections as `cfg.use_linear_projection` says."""
    return Transformer2D(channels, cfg.heads_at(level), cfg.cross_attention_dim, cfg.norm_num_groups,
                         depth=cfg.depth_at(level), linear=cfg.use_linear_projection)


class DownBlock(nn.Module):
    """One resolution level of the encoder: `layers` resnets (each followed by a transformer where the level has
    attention), then a stride-2 downsampler except at the last level. Returns the output and the skips, one per
    layer (the downsampler counts as the last layer)."""

    def __init__(self, c_in: int, c_out: int, temb: int, cfg: UNetConfig, level: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, temb, cfg.norm_num_groups, cfg.norm_eps)
            for i in range(cfg.layers_per_block)
        )
        self.attentions = nn.ModuleList(
            transformer(c_out, cfg, level) for _ in range(cfg.layers_per_block if cfg.attention_levels[level] else 0)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(c_out)] if downsample else [])

    def forward(self, x, temb, context, cross_frame, merging=None, layers: int | None = None):
        """`layers`: run only the first that many layers (the shallow branch of a cached UNet call)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            if layers is not None and len(skips) == layers:
                return x, skips
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context, cross_frame, merging)
            skips.append(x)
        for down in self.downsamplers:
            if layers is not None and len(skips) == layers:
                return x, skips
            x = down(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet → transformer → resnet at the lowest resolution (the transformer: the deepest level's heads and depth,
    as diffusers' `mid_block`)."""

    def __init__(self, c: int, temb: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, c, temb, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2)
        )
        self.attentions = nn.ModuleList([transformer(c, cfg, len(cfg.block_out_channels) - 1)])

    def forward(self, x, temb, context, cross_frame, merging=None):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, cross_frame, merging)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One resolution level of the decoder: `layers + 1` resnets, each fed the running features concatenated with
    one skip from the encoder (last skip first), transformers where the level has attention, then ×2 upsampling
    except at the last level."""

    def __init__(self, c_in_skips: list[int], c_prev: int, c_out: int, temb: int, cfg: UNetConfig,
                 level: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((c_prev if i == 0 else c_out) + c_skip, c_out, temb, cfg.norm_num_groups, cfg.norm_eps)
            for i, c_skip in enumerate(c_in_skips)
        )
        self.attentions = nn.ModuleList(
            transformer(c_out, cfg, level) for _ in range(len(c_in_skips) if cfg.attention_levels[level] else 0)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)] if upsample else [])

    def forward(self, x, skips, temb, context, cross_frame, merging=None, start: int = 0, stop: int | None = None):
        """Layers [start, stop) of the level (all by default); the upsampler follows the level's last layer. A
        cached UNet call splits a level at its branch (`UNet.run_decoder`)."""
        stop = len(self.resnets) if stop is None else stop
        for i in range(start, stop):
            x = self.resnets[i](torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context, cross_frame, merging)
        if stop < len(self.resnets):
            return x
        for up in self.upsamplers:
            x = up(x, size=skips[-1].shape[-2:])  # the next level's skip: 2h×2w, or 2h−1 where h was odd
        return x


def add_encoder(module: nn.Module, cfg: UNetConfig) -> list[int]:
    """Give `module` the UNet's encoder under the checkpoints' names: `conv_in`, `time_embedding` (and SDXL's
    `add_embedding`, where `cfg.addition_embed_type` is "text_time"), `down_blocks`, `mid_block`. Shared by `UNet`
    and `ControlNet`, whose encoder is a copy of the UNet's. Returns the channels of the skips in encoder order
    (conv_in's output first)."""
    channels = cfg.block_out_channels
    temb = 4 * channels[0]
    module.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
    module.time_embedding = TimestepEmbedding(channels[0], temb)
    if cfg.addition_embed_type == "text_time":
        module.add_embedding = TextTimeEmbedding(cfg.projection_class_embeddings_input_dim, temb,
                                                 cfg.addition_time_embed_dim)
    module.down_blocks = nn.ModuleList()
    skip_channels = [channels[0]]
    for i, c_out in enumerate(channels):
        last = i == len(channels) - 1
        c_in = channels[max(i - 1, 0)]
        module.down_blocks.append(DownBlock(c_in, c_out, temb, cfg, i, not last))
        skip_channels += [c_out] * (cfg.layers_per_block + (0 if last else 1))
    module.mid_block = MidBlock(channels[-1], temb, cfg)
    return skip_channels


def run_encoder(module: nn.Module, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                cross_frame: CrossFrame | None, merging: TokenMerging | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The down blocks and mid block of an `add_encoder` module on x = conv_in's output (n, c0, h, w) →
    (the mid block's output, the skips in encoder order, x first). `merging`: token merging at the levels it
    covers (`sd.tome.merging_at`)."""
    skips = [x]
    for level, block in enumerate(module.down_blocks):
        x, block_skips = block(x, temb, context, at_level(cross_frame, level), merging_at(merging, level))
        skips += block_skips
    deepest = len(module.down_blocks) - 1
    return module.mid_block(x, temb, context, at_level(cross_frame, deepest), merging_at(merging, deepest)), skips


class UNet(nn.Module):
    """ε_θ(x_t, t, c): predicts the noise in x_t (Ho et al. 2020, Eq. 11) given the text tokens c (and, for SDXL,
    the pooled text embedding and the size/crop micro-conditioning, `added_cond`)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        channels = cfg.block_out_channels
        levels = len(channels)
        temb = 4 * channels[0]
        skip_channels = add_encoder(self, cfg)

        self.up_blocks = nn.ModuleList()
        c_prev = channels[-1]
        for i, c_out in enumerate(reversed(channels)):
            level = levels - 1 - i
            c_skips = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(
                UpBlock(c_skips, c_prev, c_out, temb, cfg, level, upsample=level > 0)
            )
            c_prev = c_out

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int | float,
        context: torch.Tensor,
        cross_frame: CrossFrame | None = None,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
        merging: TokenMerging | None = None,
        cache: FeatureCache | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (n, c_in, h, w) noisy latents, t (n,) or a scalar timestep, context (n, 77, 768) → ε (n, c_out, h, w).

        `added_cond` (SDXL only, where it is required; `check_added_cond`): "text_embeds" (r, 1280), the pooled
        text embedding, and "time_ids" (r, 6), the original size, crop top-left and target size (Podell et al.
        2023, Sec. 2.2–2.3), with r as for `context`: n, or one per group of n / r consecutive rows (one per video).
        Their embedding is added to the timestep embedding, which every resnet sees (`embed_time`), so it also
        conditions the branch of a cached call.

        With `cross_frame`, n = videos · frames, frames folded video-major (`(b f) c h w`), and every `attn1`
        becomes cross-frame attention (T2V-Zero Eq. 8), or only those of the levels in `cross_frame.levels`.
        Any h, w: upsampling matches each skip's size.
        `context` may also hold one row per group of n / len(context) consecutive rows (one per video, shared by
        its frames): the text keys and values are then projected once per video (`Attention.text_attention`).

        `down_residuals` (one per skip, in encoder order, each the skip's shape) and `mid_residual` (the mid-block
        output's shape), as `ControlNet.forward` returns them, are added to the skips and to the mid-block output:
        the y_c = F(x; Θ) + Z(...) of ControlNet (Zhang et al. 2023, Eq. 2) for the locked UNet. The encoder path
        itself is unchanged (the residuals reach the decoder only), as in diffusers' `down_block_additional_residuals`
        / `mid_block_additional_residual`.

        `merging`: Token Merging for SD (`sd.tome.TokenMerging`) in the transformer blocks of the levels downsampled
        at most `merging.max_downsample` (level i: 2**i), frames merged each with its own matching. None or ratio 0:
        the exact path, no merging code runs.

        `cache` (DeepCache, `deepcache.py`): on a full call the whole UNet runs and the feature entering the decoder
        layer of branch `cache.branch` is kept; on a cached call only the branch runs (conv_in, the encoder layers
        that make skips 0..B, the decoder layers that consume them) on the kept feature, so the deep layers do not
        run. The ControlNet residuals are then added to the skips the branch computes; the kept feature holds none:
        where it is the mid block's output (the deepest branch) this call's `mid_residual` is added to it, as to a
        computed one. Both as DeepCache's `DeepCacheSDHelper` on diffusers' UNet.
        """
        n = x.shape[0]
        check_context_rows(n, context)
        if down_residuals is not None and len(down_residuals) != skip_count(self.config):
            raise ValueError(f"{len(down_residuals)} down residuals for a UNet with {skip_count(self.config)} skips")
        if cache is not None:
            check_branch(cache.branch, self.config)
        temb = embed_time(self, t, x, added_cond)
        if cache is not None and not cache.begin_call(x):
            return self.cached_forward(x, temb, context, cross_frame, down_residuals, mid_residual, cache, merging)

        shape = tuple(x.shape)
        x, skips = run_encoder(self, self.conv_in(x), temb, context, cross_frame, merging)
        if down_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_residuals)]  # (n, c, h_i, w_i) each
        mid = x
        if mid_residual is not None:
            x = x + mid_residual
        if cache is None:
            x = self.run_decoder(x, skips, temb, context, cross_frame, merging)
        else:  # the deep decoder layers, then the branch's, keeping the feature between them
            split = self.branch_layer(cache.branch)
            x = self.run_decoder(x, skips, temb, context, cross_frame, merging, stop=split)
            cache.store(mid if split == 0 else x, shape)  # at the mid block: its own output, no residual
            x = self.run_decoder(x, skips, temb, context, cross_frame, merging, start=split)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def cached_forward(self, x, temb, context, cross_frame, down_residuals, mid_residual, cache: FeatureCache,
                       merging: TokenMerging | None = None):
        """A cached call of `forward`: branch B alone, on the feature the last full call kept."""
        x = self.conv_in(x)
        skips = [x]
        for level, block in enumerate(self.down_blocks):  # the encoder layers that make skips 1..B
            if len(skips) > cache.branch:
                break
            x, block_skips = block(x, temb, context, at_level(cross_frame, level), merging_at(merging, level),
                                   layers=cache.branch + 1 - len(skips))
            skips += block_skips
        if down_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_residuals)]
        split = self.branch_layer(cache.branch)
        x = cache.feature
        if split == 0 and mid_residual is not None:
            x = x + mid_residual
        x = self.run_decoder(x, skips, temb, context, cross_frame, merging, start=split)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def branch_layer(self, branch: int) -> int:
        """The index, counted from the deepest, of the decoder layer that consumes skip `branch`: S − 1 − branch."""
        return skip_count(self.config) - 1 - branch

    def run_decoder(self, x, skips, temb, context, cross_frame, merging: TokenMerging | None = None, start: int = 0,
                    stop: int | None = None):
        """The decoder layers [start, stop), counted from the deepest (L+1 a level, the deepest level first), on x
        and the skips they consume (popped from the end of `skips`)."""
        per_level = self.config.layers_per_block + 1
        stop = len(self.up_blocks) * per_level if stop is None else stop
        for i, block in enumerate(self.up_blocks):
            first = i * per_level  # the index of this level's first layer
            if first + per_level <= start or first >= stop:
                continue
            level = len(self.up_blocks) - 1 - i
            x = block(x, skips, temb, context, at_level(cross_frame, level), merging_at(merging, level),
                      start=max(start - first, 0), stop=min(stop - first, per_level))
        return x
