"""Attention and the transformer blocks of the SD 1.5 and SDXL UNets (CompVis `SpatialTransformer` / diffusers
`Transformer2DModel`), with Text2Video-Zero's cross-frame attention as a mode of self-attention.

Axis letters: b batch, f frames, n tokens, c channels, h w spatial, d head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

if TYPE_CHECKING:
    from .tome import TokenMerging

CROSS_FRAME_MODES = ("first", "first+previous", "off")


class AnchorKeys:
    """Frame 1's keys and values in every cross-frame self-attention layer, kept between the UNet calls of one
    denoising step when a long video is denoised in chunks (`method/chunks.py`): the first chunk, which holds
    frame 1, records them; the later chunks, which do not, attend to them (`replaying`). So frame 1 runs through
    the UNet once per step, and every frame attends to the same K¹, V¹ as in one unchunked call.

    With token merging (`sd.tome`), `destinations` keeps each transformer block's destination choice the same way:
    drawn by the first chunk, replayed by the later ones, so every chunk is partitioned as one unchunked call is.

    In a torch.compile'd UNet the dict writes are side effects that dynamo applies after the graph runs, and it
    guards on `replaying` and on the dicts' sizes, not on which AnchorKeys a step makes: one graph records, one
    replays (per chunk size), for every step and generation (tests/test_compile.py)."""

    def __init__(self):
        self.kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.destinations: dict[nn.Module, torch.Tensor] = {}
        self.replaying = False


@dataclass(frozen=True)
class CrossFrame:
    """How self-attention (`attn1`) mixes the frames of a video (T2V-Zero Eq. 8).

    The UNet sees frames folded into the batch, `(b f) n c`, video-major: rows [0, f) are video 0, and so on.
    `num_frames` is given explicitly, never inferred from the batch size.
      first           every frame attends to the first frame's keys and values (the paper)
      first+previous  to the first and the previous frame's (Tune-A-Video's sparse-causal attention)
      off             ordinary per-frame self-attention
    `levels` (an ablation, not the paper): the UNet levels whose self-attention mixes frames, 0 the full latent
    resolution, 1 half of it, and so on (the mid block is at the deepest level); the others keep per-frame
    self-attention. None: every level, as in the paper.
    `anchor` (mode "first" only): frame 1's keys and values shared between the chunks of one step (`AnchorKeys`);
    while it replays, the batch holds no frame 1 and all `num_frames` frames attend to the recorded K¹, V¹.
    """

    num_frames: int
    mode: str = "first"
    levels: tuple[int, ...] | None = None
    anchor: AnchorKeys | None = field(default=None, compare=False)

    def __post_init__(self):
        check_cross_frame_mode(self.mode)
        if int(self.num_frames) < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.levels is not None:
            object.__setattr__(self, "levels", check_levels(self.levels))


def at_level(cross_frame: CrossFrame | None, level: int) -> CrossFrame | None:
    """The cross-frame attention of UNet level `level`: `cross_frame`, or None (per-frame self-attention) where it
    is None or its `levels` leave the level out."""
    if cross_frame is None or cross_frame.levels is None or level in cross_frame.levels:
        return cross_frame
    return None


def check_levels(levels, prefix: str = "") -> tuple[int, ...]:
    """`levels` as a sorted tuple of distinct integers >= 0, or ValueError naming it (`prefix`: its config
    section, "method." for `python -m t2vz`)."""
    values = list(levels)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values) \
            or len(set(values)) != len(values):
        raise ValueError(f"{prefix}cross_frame_levels={values!r} must be distinct UNet levels (integers >= 0; 0 is "
                         f"the full latent resolution), or None (null in a config) for every level, the paper")
    return tuple(sorted(values))


def check_cross_frame_mode(mode: str) -> None:
    """ValueError unless `mode` is one of CROSS_FRAME_MODES."""
    if mode not in CROSS_FRAME_MODES:
        raise ValueError(f"cross_frame={mode!r} is not one of {CROSS_FRAME_MODES}")


def check_cross_frame_levels(levels, cross_frame: str, attention_levels: tuple[bool, ...] | None = None,
                             prefix: str = "") -> None:
    """ValueError unless `levels` is None, or distinct levels with cross-frame attention on (`cross_frame` not
    "off"), each of which has self-attention in a UNet with these `attention_levels` (when given; the deepest level
    always has it, through the mid block). `prefix` as in `check_levels`."""
    if levels is None:
        return
    levels = check_levels(levels, prefix)
    if cross_frame == "off":
        raise ValueError(f"{prefix}cross_frame_levels={list(levels)} needs cross-frame attention, but "
                         f"{prefix}cross_frame='off'; leave {prefix}cross_frame_levels unset")
    if attention_levels is None:
        return
    depth = len(attention_levels)
    if levels[-1] >= depth:
        raise ValueError(f"{prefix}cross_frame_levels={list(levels)}: this UNet has levels 0..{depth - 1} "
                         f"(0 is the full latent resolution, {depth - 1} the deepest, with the mid block)")
    attended = [i for i in range(depth) if attention_levels[i] or i == depth - 1]
    if any(i not in attended for i in levels):
        raise ValueError(f"{prefix}cross_frame_levels={list(levels)}: this UNet has self-attention only at levels "
                         f"{attended}, so cross-frame attention could not act at the others; choose among those")


class SelfAttentionProbe:
    """Where one frame's self-attention queries look, at one denoising step, in chosen self-attention layers
    (`attn1`): what a generation's trace (`method/trace.py`) draws as heat maps, a point of frame k attending in
    frame 1 under cross-frame attention (T2V-Zero Eq. 8, softmax(Qᵏ·(K¹)ᵀ/√d)) and, beside it, within frame k
    itself (per-frame self-attention, softmax(Qᵏ·(Kᵏ)ᵀ/√d)).

    While entered (`with probe:`) it is the `recorder` of each of `layers`. It keeps nothing until `arm()`; then, at
    each layer's calls until `disarm()`, it projects, with the layer's own to_q and to_k, the queries Qᵏ of frame
    `frame` (a 0-based frame id) and the keys K¹ of frame 1 and Kᵏ of that frame, of one video and guidance branch
    (`group`), each (n, c) in float32. The weights of a query token are computed afterwards (`weights`), so the
    point can be chosen once the video exists (the subject's centre in the final frame). Only the projections are
    kept, n·c numbers each, not an n×n map (SD 1.5's finest layer at 512×512: n = 4096, c = 320).

    Which rows: the UNet batch is groups of the chunk's frames, video-major ([uncond videos; text videos] under
    classifier-free guidance, `group` = the text branch's first video); `chunks` (`method.chunks.frame_chunks`,
    [all frame ids] when unchunked) are the frames each UNet call of one step holds, in order, so the i-th call of a
    layer after `arm()` holds chunk i. Frame 1 is in the first chunk only; K¹ is taken there, whatever the
    cross-frame mode, and serves a frame of a later chunk. Nothing here changes x or the layer's output."""

    def __init__(self, layers, frame: int, chunks, group: int):
        self.layers = list(layers)
        self.frame, self.group = int(frame), int(group)
        self.chunks = [list(ids) for ids in chunks]
        self.armed = False
        self.calls: dict[nn.Module, int] = {}
        self.queries: dict[nn.Module, torch.Tensor] = {}     # Qᵏ (n, c)
        self.keys_first: dict[nn.Module, torch.Tensor] = {}  # K¹ (n, c)
        self.keys_own: dict[nn.Module, torch.Tensor] = {}    # Kᵏ (n, c)

    def __enter__(self) -> "SelfAttentionProbe":
        if any(attn.recorder is not None for attn in self.layers):
            raise RuntimeError("a self-attention layer is already recording: one SelfAttentionProbe at a time")
        for attn in self.layers:
            attn.recorder = self
        return self

    def __exit__(self, *exc) -> None:
        for attn in self.layers:
            if attn.recorder is self:
                attn.recorder = None
        self.armed = False

    def arm(self) -> None:
        """Record the layers' next calls (one denoising step's: one call per chunk)."""
        self.armed, self.calls = True, {}

    def disarm(self) -> None:
        self.armed = False

    @torch.no_grad()
    def record_self(self, attn: nn.Module, x: torch.Tensor, cross_frame: CrossFrame | None) -> None:
        """One call of self-attention layer `attn` on x ((g f) n c), the f frames of the call's chunk: Qᵏ and Kᵏ
        where the chunk holds frame k, K¹ where it holds frame 1."""
        if not self.armed:
            return
        call = self.calls.get(attn, 0)
        self.calls[attn] = call + 1
        ids = self.chunks[call % len(self.chunks)]
        rows = x.reshape(-1, len(ids), *x.shape[1:])[self.group]  # (f, n, c): this video's frames of the chunk
        if ids[0] == 0:
            self.keys_first[attn] = attn.to_k(rows[0]).float()
        if ids[0] <= self.frame < ids[0] + len(ids):
            own = rows[self.frame - ids[0]]
            self.queries[attn], self.keys_own[attn] = attn.to_q(own).float(), attn.to_k(own).float()

    def recorded(self, attn: nn.Module) -> bool:
        """Whether `attn` ran while armed (a layer that feature caching skips at that step did not)."""
        return attn in self.queries and attn in self.keys_first

    def weights(self, attn: nn.Module, token: int, own: bool = False) -> torch.Tensor:
        """softmax(q·Kᵀ/√d) of frame k's query token `token`, per head, averaged over the heads: over frame 1's n
        tokens (K¹, Eq. 8), or over frame k's own (Kᵏ) with `own`. (n,) float32, summing to 1."""
        keys = (self.keys_own if own else self.keys_first)[attn]
        q = rearrange(self.queries[attn][token], "(heads d) -> heads 1 d", heads=attn.heads)
        k = rearrange(keys, "n (heads d) -> heads n d", heads=attn.heads)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(0)[0]


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention` (Vaswani et al. 2017).

    Self-attention when `context` is None, cross-attention to `context` (text tokens) otherwise.

    `recorder`: None, or an object that sees every call's input, set while it records: `record(attn, x, context)`
    for a cross-attention layer (`method.smoothing.CrossAttentionMaps`, the foreground maps of background
    smoothing), `record_self(attn, x, cross_frame)` for a self-attention layer (`SelfAttentionProbe`, the attention
    maps of a generation's trace). An attribute the forward consults rather than a forward hook: torch.compile
    inlines the hooks a module has when it traces it and does not guard on them, so a compiled UNet would keep
    calling the first recorder's hook; the attribute is guarded (None or not, and the recorder's type), so
    recording and plain calls each get their graph, and a new recorder reuses it. None (the default) costs one
    `is None` test per call and computes nothing.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.recorder = None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # key `to_out.0`, as in the checkpoints

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ/√d) v over heads: (B, nq, c), (B, nk, c), (B, nk, c) → (B, nq, c)."""
        q, k, v = (rearrange(t, "b n (heads d) -> b heads n d", heads=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return rearrange(out, "b heads n d -> b n (heads d)")

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, cross_frame: CrossFrame | None = None
    ) -> torch.Tensor:
        """x (b, n, c), context (b, m, c_ctx), (b/g, m, c_ctx) or None → (b, n, c). With `cross_frame`,
        b = videos · frames."""
        if context is not None:
            if self.recorder is not None:
                self.recorder.record(self, x, context)
            return self.to_out[0](self.text_attention(x, context))
        if self.recorder is not None:
            self.recorder.record_self(self, x, cross_frame)
        if cross_frame is None or cross_frame.mode == "off":
            return self.to_out[0](self.attend(self.to_q(x), self.to_k(x), self.to_v(x)))
        if x.shape[0] % cross_frame.num_frames:
            raise ValueError(
                f"batch of {x.shape[0]} frames is not a whole number of videos of {cross_frame.num_frames} frames"
            )
        if cross_frame.mode == "first":
            return self.to_out[0](self.first_frame_attention(x, cross_frame.num_frames, cross_frame.anchor))
        return self.to_out[0](self.sparse_causal_attention(x, cross_frame.num_frames))

    def text_attention(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention to the text tokens, softmax(Q Kᵀ/√d) V with K, V projected from `context`.

        `context` may hold one row per group of g consecutive batch rows (the frames of one video share their
        prompt): K and V are then projected once per group instead of once per frame, and the group's queries are
        folded into one sequence of g·n tokens. Every query attends independently, so this equals per-row
        attention with the context repeated g times. (b g) n c, (b, m, c_ctx) → (b g) n c.
        """
        g = x.shape[0] // context.shape[0]  # not divmod: torch.compile cannot trace it
        if g == 0 or g * context.shape[0] != x.shape[0]:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot share {context.shape[0]} text contexts evenly")
        q = rearrange(self.to_q(x), "(b g) n c -> b (g n) c", g=g)
        out = self.attend(q, self.to_k(context), self.to_v(context))
        return rearrange(out, "b (g n) c -> (b g) n c", g=g)

    def first_frame_attention(self, x: torch.Tensor, f: int, anchor: AnchorKeys | None = None) -> torch.Tensor:
        """Cross-Frame-Attn(Qᵏ, K¹, V¹) = softmax(Qᵏ (K¹)ᵀ/√d) V¹ for every frame k (T2V-Zero Eq. 8).

        K and V are projected from the first frame only; the queries of all f frames of one video are folded into
        one sequence of f·n tokens that attends to the first frame's n tokens in a single SDPA call. With an
        `anchor` that replays, K¹ and V¹ are the ones recorded for this layer and x holds later frames only.
        (b f) n c → (b f) n c.
        """
        x = rearrange(x, "(b f) n c -> b f n c", f=f)
        q = rearrange(self.to_q(x), "b f n c -> b (f n) c")
        if anchor is not None and anchor.replaying:
            k, v = anchor.kv[self]  # (b, n, c) each, from the chunk that held frame 1
        else:
            first = x[:, 0]  # (b, n, c): the first frame
            k, v = self.to_k(first), self.to_v(first)
            if anchor is not None:
                anchor.kv[self] = (k, v)
        out = self.attend(q, k, v)
        return rearrange(out, "b (f n) c -> (b f) n c", f=f)

    def sparse_causal_attention(self, x: torch.Tensor, f: int) -> torch.Tensor:
        """Frame k attends to [frame 1, frame k−1] (frame 1 to itself twice), Tune-A-Video's sparse-causal attention.

        (b f) n c → (b f) n c.
        """
        k = rearrange(self.to_k(x), "(b f) n c -> b f n c", f=f)
        v = rearrange(self.to_v(x), "(b f) n c -> b f n c", f=f)
        previous = torch.clamp(torch.arange(f, device=x.device) - 1, min=0)
        k = torch.cat([k[:, :1].expand_as(k), k[:, previous]], dim=2)  # (b, f, 2n, c)
        v = torch.cat([v[:, :1].expand_as(v), v[:, previous]], dim=2)
        k, v = (rearrange(t, "b f n c -> (b f) n c") for t in (k, v))
        return self.attend(self.to_q(x), k, v)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2·inner, the second half gates the first."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU → Linear, keys `net.0.proj` and `net.2` (net.1 is a dropout in the checkpoints' code)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention (`attn1`, where cross-frame attention lives), text cross-attention
    (`attn2`), feed-forward; each with a residual connection. (b, n, c) → (b, n, c).

    With `merging` (ToMe for SD, `sd.tome`; `grid` = the tokens' h, w), as tomesd's diffusers block: the matching is
    computed on the block's input x, before any norm; each sublayer the options name runs on the merged tokens of
    its normalised input, and its output is unmerged before the residual add, so the residual stream keeps all n
    tokens. Under cross-frame attention every frame is merged with its own matching (on one partition), so all
    frames have n − r tokens and frame 1's keys and values come from its merged tokens, as in tomesd patched into
    diffusers' TextToVideoZeroPipeline.

    `temporal`: None, or Tune-A-Video's temporal attention over the frames (`sd.temporal.inflate` sets it, with the
    `norm_temp` and `attn_temp` layers it uses): `temporal(block, x, cross_frame)` after the feed-forward, on all
    n tokens (after the unmerge, with token merging). None leaves the block, and its state dict, the image model's.
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.temporal = None  # Tune-A-Video's temporal attention, where `sd.temporal.inflate` adds it

    def forward(self, x: torch.Tensor, context: torch.Tensor, cross_frame: CrossFrame | None = None,
                merging: TokenMerging | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if merging is not None:
            x = self.merged_forward(x, context, cross_frame, merging, grid)
        else:
            x = x + self.attn1(self.norm1(x), cross_frame=cross_frame)
            x = x + self.attn2(self.norm2(x), context=context)
            x = x + self.ff(self.norm3(x))
        return x if self.temporal is None else self.temporal(self, x, cross_frame)

    def merged_forward(self, x: torch.Tensor, context: torch.Tensor, cross_frame: CrossFrame | None,
                       merging: TokenMerging, grid: tuple[int, int]) -> torch.Tensor:
        """The block with token merging; x (b, h·w, c) → (b, h·w, c)."""
        anchor = cross_frame.anchor if cross_frame is not None else None
        matching = merging.plan(x, *grid, anchor=anchor, key=self)

        def through(merged: bool, sublayer, y: torch.Tensor) -> torch.Tensor:
            return matching.around(sublayer, y) if merged and matching is not None else sublayer(y)

        x = x + through(merging.merge_attn, lambda y: self.attn1(y, cross_frame=cross_frame), self.norm1(x))
        x = x + through(merging.merge_crossattn, lambda y: self.attn2(y, context=context), self.norm2(x))
        return x + through(merging.merge_mlp, self.ff, self.norm3(x))


class Transformer2D(nn.Module):
    """GroupNorm → projection in → `depth` transformer blocks over the h·w tokens → projection out, plus the input
    (residual).

    SD 1.5 projects with 1×1 convs on the (b, c, h, w) map, before the rearrangement to tokens and after the one
    back. SDXL (Podell et al. 2023) projects with `linear` layers on the tokens instead (diffusers'
    `use_linear_projection`), the same map per token with (c, c) rather than (c, c, 1, 1) weights, and stacks
    `depth` blocks per transformer (up to 10 at its deepest level), keys `transformer_blocks.0..depth-1`.

    (b, c, h, w), context (b, n, c_ctx) → (b, c, h, w). `merging` (token merging, `sd.tome`) is handed to the
    blocks with the token grid's h, w.

    The output has the memory layout of the input (`memory_layout`): contiguous NCHW, or channels-last where the
    model runs channels-last (CPU bf16/fp16, `sd.loading.channels_last_for`). Folding the tokens back to
    (b, c, h, w) gives a view in whatever layout the tokens had: c-major tokens (a view of a 1×1 conv's NCHW
    output, kept so by the blocks' residual adds) fold back to NCHW, but contiguous tokens (those of a linear
    `proj_in`, SDXL) fold back to an NHWC-strided view, which the residual add and every later conv (cuDNN follows
    its input's layout) would carry on, turning an NCHW model channels-last from its first transformer. So the
    folded tensor is made contiguous in the input's layout (a no-op where it already is; diffusers calls
    `.contiguous()`, which assumes NCHW).
    """

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int = 32, depth: int = 1,
                 linear: bool = False):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, cross_frame: CrossFrame | None = None,
                merging: TokenMerging | None = None) -> torch.Tensor:
        _, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, cross_frame, merging, (h, w))
        if self.linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous(memory_format=memory_layout(residual))
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


def memory_layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format x (b, c, h, w) is laid out in: channels_last where it is NHWC-strided and not NCHW-contiguous
    (where both hold, c = 1 or h = w = 1, the two layouts are the same bytes), contiguous_format otherwise."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
