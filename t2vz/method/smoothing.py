"""Background smoothing (T2V-Zero Sec. 3.3, optional): pull each frame's background towards the first frame's,
warped by the frame's motion, while the foreground (mask M) keeps its own latent:

    x̄_tᵏ = Mᵏ ⊙ x_tᵏ + (1 − Mᵏ) ⊙ (α·x̂_tᵏ + (1 − α)·x_tᵏ),   x̂_tᵏ = W_k(x_t¹)          (paper, every step)

The authors' code instead blends once, at T₁, inside the background of both the frame and the warped first frame,
B = (1 − Mᵏ)(1 − W_k(M¹)), with masks dilated by a 5×5 kernel at latent resolution ("authors" form).

The paper's masks come from a salient-object detector that was never released. Here they come, training-free,
from the UNet's own cross-attention maps for the prompt's subject tokens (`CrossAttentionMaps`), or from the caller.
Axis letters: b videos, f frames, c channels, h w latent spatial, n tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..sd.attention import BasicTransformerBlock
from .motion import warp_latents

SMOOTHING_FORMS = ("paper", "authors")
CONTEXT_TOKENS = 77  # the text context's length (CLIP's), in which `token_positions` finds the words


def blend_background(x: torch.Tensor, warped_first: torch.Tensor, foreground: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """The paper's blend: M ⊙ x + (1 − M) ⊙ (α·x̂ + (1 − α)·x); x, x̂ (n, c, h, w), M (n, 1, h, w) in [0, 1]."""
    return foreground * x + (1 - foreground) * (alpha * warped_first + (1 - alpha) * x)


def dilate(mask: torch.Tensor, kernel: int = 5) -> torch.Tensor:
    """Binary dilation by a kernel×kernel square (max-pooling): (n, 1, h, w) → (n, 1, h, w)."""
    return F.max_pool2d(mask, kernel, stride=1, padding=kernel // 2)


def smooth_video(x: torch.Tensor, foreground: torch.Tensor, path: torch.Tensor, alpha: float,
                 form: str = "paper") -> torch.Tensor:
    """Smooth the background of frames 2..f of each video towards its warped first frame.

    x (b, c, f, h, w) latents, foreground (b, f, h, w) masks in [0, 1], path (f, 2, 3) the frames' motion
    (T2V-Zero's δᵏ, frame 1 unmoved) → (b, c, f, h, w). Frame 1 is returned unchanged.
    """
    b, c, f, h, w = x.shape
    if f == 1:
        return x
    first = x[:, :, :1].expand(b, c, f - 1, h, w)
    later_path = path[1:].repeat(b, 1, 1)
    warped = warp_latents(rearrange(first, "b c f h w -> (b f) c h w"), later_path)
    later = rearrange(x[:, :, 1:], "b c f h w -> (b f) c h w")
    mask = rearrange(foreground[:, 1:], "b f h w -> (b f) 1 h w").to(x.dtype)
    if form == "paper":
        blended = blend_background(later, warped, mask, alpha)
    elif form == "authors":
        first_mask = rearrange(foreground[:, :1].expand(b, f - 1, h, w), "b f h w -> (b f) 1 h w").to(x.dtype)
        moved_first_mask = warp_latents(dilate(first_mask), later_path)
        background = (1 - dilate(mask)) * (1 - moved_first_mask)
        blended = blend_background(later, warped, 1 - background, alpha)
    else:
        raise ValueError(f"smoothing={form!r} is not one of {SMOOTHING_FORMS}")
    blended = rearrange(blended, "(b f) c h w -> b c f h w", b=b)
    return torch.cat([x[:, :, :1], blended], dim=2)


def token_positions(tokenizer, prompt: str, words: str | None) -> list[int]:
    """Positions (in the 77-token sequence) of `words` in `prompt`; all of the prompt's tokens when None."""
    ids = tokenizer(prompt, truncation=True, max_length=CONTEXT_TOKENS).input_ids
    content = list(range(1, len(ids) - 1))  # between <|startoftext|> and <|endoftext|>
    if words is None or not words.strip():
        return content
    positions = []
    for word in words.split():
        target = tokenizer(word, add_special_tokens=False).input_ids
        hits = [i for i in content if ids[i : i + len(target)] == target]
        if not hits:
            raise ValueError(f"mask token {word!r} does not occur in the prompt {prompt!r}")
        positions += [i + j for i in hits for j in range(len(target))]
    return sorted(set(positions))


class CrossAttentionMaps:
    """Record, while active, how much every latent pixel attends to chosen text tokens in the UNet's text
    cross-attention (`attn2`), averaged over heads, tokens, layers and steps (a training-free foreground map).

    `with CrossAttentionMaps(unet, positions, latent_hw, rows) as maps: unet(...)`; then `maps.mean()` is
    (rows, h, w). `positions[r]` are the token positions for UNet batch row r (the text branch's rows under
    classifier-free guidance: `rows` = slice of the batch to record). One recorder may be entered for many UNet
    calls (every step of a chunk); one at a time per UNet.

    How it records, and why so: while entered it is every `attn2`'s `recorder` (`sd.attention.Attention`), which
    hands it each call's input, and everything it keeps between calls is a tensor on the UNet's device: the token
    positions as averaging weights (rows, 77), the running sum of the maps and the call count, made once in
    `__enter__`. So a torch.compile'd UNet traces the recording like any other op, without graph breaks: dynamo
    guards on whether a recorder is set and on its type, not on which one, and a new recorder (every chunk, every
    video) reuses the recording graph instead of recompiling, and adds no host-to-device copies per step. (Forward
    hooks, the obvious tool, are inlined into the graph the first time and never checked again, so a compiled UNet
    kept feeding the first video's recorder and the next video found none recorded.)
    """

    def __init__(self, unet, positions: list[list[int]], latent_hw: tuple[int, int], rows: slice):
        self.unet, self.positions, self.hw, self.rows = unet, positions, tuple(latent_hw), rows
        self.weights: torch.Tensor | None = None  # (rows, 77): 1/|positions[r]| at row r's positions, else 0
        self.total: torch.Tensor | None = None    # (rows, h, w) float32: the sum of the recorded maps
        self.calls: torch.Tensor | None = None    # (): how many attention calls were recorded
        self.modules: list[nn.Module] = []

    def __enter__(self) -> "CrossAttentionMaps":
        if self.weights is None:  # the first entry: the recorder's tensors, on the UNet's device
            device = next(self.unet.parameters()).device
            # as wide as the context whatever the prompt, so that every prompt's recorder has the same shapes
            # and a compiled UNet records every prompt in one graph
            width = max(CONTEXT_TOKENS, 1 + max((p for pos in self.positions for p in pos), default=0))
            weights = torch.zeros(len(self.positions), width)
            for r, pos in enumerate(self.positions):
                weights[r, pos] = 1 / len(pos)
            self.weights = weights.to(device)
            self.total = torch.zeros(len(self.positions), *self.hw, device=device)
            self.calls = torch.zeros((), dtype=torch.long, device=device)
        modules = [block.attn2 for block in self.unet.modules() if isinstance(block, BasicTransformerBlock)]
        if any(attn.recorder is not None for attn in modules):
            raise RuntimeError("this UNet is already recording its cross-attention: one CrossAttentionMaps at a time")
        for attn in modules:
            attn.recorder = self
        self.modules = modules
        return self

    def __exit__(self, *exc) -> None:
        for attn in self.modules:
            attn.recorder = None
        self.modules = []

    @torch.no_grad()
    def record(self, attn, x: torch.Tensor, context: torch.Tensor) -> None:
        """One call of `attn` (x (b, n, c), context (b or b/g, m, c_ctx)): its attention probabilities averaged over
        heads and over each row's chosen tokens (n,), bilinearly resized from the call's token grid to (h, w), added
        to the total."""
        context = context.repeat_interleave(x.shape[0] // context.shape[0], dim=0)  # one row per video → per frame
        x, context = x[self.rows], context[self.rows]
        q = rearrange(attn.to_q(x), "b n (heads d) -> b heads n d", heads=attn.heads)
        k = rearrange(attn.to_k(context), "b m (heads d) -> b heads m d", heads=attn.heads)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (b, heads, n, m)
        maps = torch.einsum("bnm,bm->bn", probs.float().mean(dim=1), self.weights[:, : probs.shape[-1]])
        h, w = self.hw
        scale = grid_scale(h, w, maps.shape[1])
        maps = rearrange(maps, "b (h w) -> b 1 h w", h=math.ceil(h / scale))
        self.total.add_(F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[:, 0])
        self.calls.add_(1)

    @property
    def count(self) -> int:
        """How many attention calls were recorded (every attn2 of every UNet call entered)."""
        return 0 if self.calls is None else int(self.calls)

    def mean(self) -> torch.Tensor:
        """The mean recorded map (rows, h, w), float32."""
        if self.count == 0:
            raise RuntimeError("no cross-attention was recorded: run the UNet inside `with CrossAttentionMaps(...)`")
        return self.total / self.count


def grid_scale(h: int, w: int, tokens: int) -> int:
    """The downsampling s of a UNet level whose token grid ⌈h/s⌉×⌈w/s⌉ holds `tokens` tokens, for an h×w latent."""
    for scale in (1, 2, 4, 8, 16, 32, 64):
        if math.ceil(h / scale) * math.ceil(w / scale) == tokens:
            return scale
    raise ValueError(f"{tokens} tokens are no downsampled grid of a {h}×{w} latent")


def masks_from_maps(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Attention maps (..., h, w) → binary foreground masks: each map min-max normalised, then thresholded."""
    flat = maps.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    normalised = (flat - lo) / (hi - lo).clamp_min(1e-12)
    return (normalised >= threshold).float().reshape(maps.shape)


def resize_masks(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Caller masks (..., H, W) in [0, 1] at image or latent resolution → (..., h, w) by area averaging."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.interpolate(flat, size=hw, mode="area").reshape(*lead, *hw)
