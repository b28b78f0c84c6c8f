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

from ..sd.attention import BasicTransformerBlock
from .motion import warp_latents

SMOOTHING_FORMS = ("paper", "authors")


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
    ids = tokenizer(prompt, truncation=True, max_length=77).input_ids
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
    classifier-free guidance: `rows` = slice of the batch to record).
    """

    def __init__(self, unet, positions: list[list[int]], latent_hw: tuple[int, int], rows: slice):
        self.unet, self.positions, self.hw, self.rows = unet, positions, latent_hw, rows
        self.total: torch.Tensor | None = None
        self.count = 0
        self.handles = []

    def __enter__(self) -> "CrossAttentionMaps":
        for block in self.unet.modules():
            if isinstance(block, BasicTransformerBlock):
                self.handles.append(block.attn2.register_forward_hook(self.record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @torch.no_grad()
    def record(self, attn, args, kwargs, output) -> None:
        x, context = args[0], kwargs["context"]
        context = context.repeat_interleave(x.shape[0] // context.shape[0], dim=0)  # one row per video → per frame
        x, context = x[self.rows], context[self.rows]
        q = rearrange(attn.to_q(x), "b n (heads d) -> b heads n d", heads=attn.heads)
        k = rearrange(attn.to_k(context), "b m (heads d) -> b heads m d", heads=attn.heads)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (b, heads, n, m)
        maps = torch.stack([probs[r, :, :, pos].mean(dim=(0, 2)) for r, pos in enumerate(self.positions)])
        h, w = self.hw
        scale = next(s for s in (1, 2, 4, 8, 16, 32, 64) if math.ceil(h / s) * math.ceil(w / s) == maps.shape[1])
        maps = rearrange(maps, "b (h w) -> b 1 h w", h=math.ceil(h / scale))
        maps = F.interpolate(maps.float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no cross-attention was recorded")
        return self.total / self.count


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
