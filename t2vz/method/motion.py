"""Motion dynamics in the latent codes: T2V-Zero Sec. 3.3, step 3 of Algorithm 1 (x̃_{T₀}ᵏ = W_k(x_{T₀}¹)).

A *path* is a float64 tensor `(f, 2, 3)`: per frame, a 2×3 affine map [A | b] on the pixel coordinates p = (x, y)
of a `grid_size`×`grid_size` reference grid (512, as in both references). Frame k samples its input at A·p + b, so
the content moves by the inverse map: a translation b = δᵏ moves the content by −δᵏ. Screen axes: x right,
y down. The grid is stretched onto the latent (h, w), so one grid pixel is w/512 latent pixels in x, h/512 in y.
The centre of the grid is (256, 256): the reference maps grid coordinate x to x/512·2 − 1, which is
`grid_sample`'s edge-aligned (align_corners=False) convention, where 0 and 512 are the image's outer edges.
Axis letters: f frames, c channels, h w latent spatial.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_F64 = torch.float64


def _finite(name: str, value: float) -> float:
    """float(value), or a ValueError naming the value when it is NaN or infinite."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    """A 2-element finite (x, y) pair, or a ValueError naming the value."""
    if len(value) != 2:
        raise ValueError(f"{name} must have 2 elements (x, y), got {len(value)}: {tuple(value)}")
    return _finite(f"{name}[0]", value[0]), _finite(f"{name}[1]", value[1])


def _ids(frame_ids: Sequence[int]) -> torch.Tensor:
    """Frame ids as a float64 vector (f,)."""
    return torch.tensor([int(k) for k in frame_ids], dtype=_F64)


def _affine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack linear parts a (f, 2, 2) and offsets b (f, 2) into a path (f, 2, 3)."""
    return torch.cat([a, b[:, :, None]], dim=2)


def _about_centre(a: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Path that applies linear parts a (f, 2, 2) about the grid centre c: p ↦ a·(p − c) + c."""
    c = torch.full((2,), grid_size / 2, dtype=_F64)
    return _affine(a, c - a @ c)


def translation_path(
    frame_ids: Sequence[int], motion_strength: float, direction: Sequence[float] = (1.0, 1.0)
) -> torch.Tensor:
    """Global translation δᵏ = λ·k·δ (T2V-Zero Sec. 3.3): A = I, b = ((λδx)·k, (λδy)·k), rounded as the references."""
    lam = _finite("motion_strength", motion_strength)
    dx, dy = _pair("direction", direction)
    ids = _ids(frame_ids)
    b = ids[:, None] * torch.tensor([lam * dx, lam * dy], dtype=_F64)
    return _affine(torch.eye(2, dtype=_F64).expand(len(ids), 2, 2), b)


def offsets_path(offsets: Sequence[Sequence[float]]) -> torch.Tensor:
    """Explicit per-frame translations b_k = offsets[k] in grid pixels (a camera path); content moves by −b_k."""
    b = torch.tensor([_pair(f"offsets[{k}]", o) for k, o in enumerate(offsets)], dtype=_F64).reshape(-1, 2)
    return _affine(torch.eye(2, dtype=_F64).expand(len(b), 2, 2), b)


def zoom_path(frame_ids: Sequence[int], rate: float, grid_size: int = 512) -> torch.Tensor:
    """Zoom by s_k = (1 + rate)^k about the centre: sample at c + (p − c)/s_k (rate > 0 zooms in, content grows)."""
    rate = _finite("rate", rate)
    if rate <= -1:
        raise ValueError(f"zoom rate must be > -1 (scale (1 + rate)^k > 0), got {rate}")
    inv_scale = (1.0 + rate) ** -_ids(frame_ids)
    return _about_centre(inv_scale[:, None, None] * torch.eye(2, dtype=_F64), grid_size)


def rotation_path(
    frame_ids: Sequence[int], degrees_per_frame: float, aspect: float = 1.0, grid_size: int = 512
) -> torch.Tensor:
    """Rotate the content by θ_k = k·θ counter-clockwise on screen (y down) about the centre.

    Content at c + (1, 0) goes to c + (cos θ, −sin θ): for θ = 90° a point right of the centre moves above it.
    Frame k samples at c + D⁻¹R(θ_k)D(p − c), R(θ) = [[cos, −sin], [sin, cos]], D = diag(aspect, 1).
    With aspect = w/h the rotation is rigid on a non-square screen; with 1 it is rigid on the square grid.
    """
    theta = torch.deg2rad(_ids(frame_ids) * _finite("degrees_per_frame", degrees_per_frame))
    aspect = _finite("aspect", aspect)
    if aspect <= 0:
        raise ValueError(f"aspect must be > 0 (w / h of the latents), got {aspect}")
    cos, sin = theta.cos(), theta.sin()
    a = torch.stack([torch.stack([cos, -sin / aspect], -1), torch.stack([sin * aspect, cos], -1)], -2)
    return _about_centre(a, grid_size)


def compose(*paths: torch.Tensor) -> torch.Tensor:
    """Chain motions: content moves by paths[0], then paths[1], …; sampling map S₀∘S₁ = [A₀A₁ | A₀b₁ + b₀]."""
    if not paths:
        raise ValueError("compose needs at least one path")
    out = paths[0]
    for nxt in paths[1:]:
        if nxt.shape != out.shape:
            raise ValueError(f"compose: path shapes differ, {tuple(out.shape)} vs {tuple(nxt.shape)}")
        out = _affine(out[:, :, :2] @ nxt[:, :, :2], (out[:, :, :2] @ nxt[:, :, 2:])[..., 0] + out[:, :, 2])
    return out


def warp_latents(latents: torch.Tensor, path: torch.Tensor, grid_size: int = 512) -> torch.Tensor:
    """Warp each frame by its affine map: T2V-Zero Sec. 3.3, Algorithm 1 step 3 (x̃_{T₀}ᵏ = W_k(x_{T₀}ᵏ)).

    latents (f, c, h, w), path (f, 2, 3) → (f, c, h, w) in the latents' dtype. The sampling grid is built on the
    grid_size² reference grid, normalised to [−1, 1], resized bilinearly to (h, w) and applied with nearest
    `grid_sample`, reflection padding: the references' `create_motion_field_and_warp_latents` in one batched call,
    bitwise equal to it for translation paths in fp32 (and fp64).

    The grid and the sampling are in fp32 whatever the latents' dtype (fp64 stays fp64). The references build the
    grid in the latents' dtype: bf16 holds only 75% of the grid's integers 0…511 exactly (above 256, every other
    one) and fp16 rounds the shifted, normalised coordinates, so their frames land on other latent pixels than
    fp32's: on an index grid, 4 frames, δ = (1, 1), bf16 moved 37% of the pixels of 64² latents at λ = 12 and 66%
    of 128² ones at λ = 7.3 (up to 2 px), fp16 11% at 128², λ = 7.3 (docs/method.md). Nearest sampling copies
    values, so sampling an fp32 copy and casting back gives values the latents' dtype holds exactly.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be 4-D (f, c, h, w), got shape {tuple(latents.shape)}")
    if path.ndim != 3 or path.shape[1:] != (2, 3) or path.shape[0] != latents.shape[0]:
        raise ValueError(
            f"path must be (f, 2, 3) with f = {latents.shape[0]} frames of the latents, got {tuple(path.shape)}"
        )
    work = torch.promote_types(latents.dtype, torch.float32)  # fp32 for fp32/fp16/bf16 latents, fp64 for fp64
    grid = sampling_grid(path, latents.shape[-2:], grid_size, dtype=work, device=latents.device)
    warped = F.grid_sample(latents.to(work), grid, mode="nearest", padding_mode="reflection", align_corners=False)
    return warped.to(latents.dtype)


def applied_shifts(path: torch.Tensor, size: Sequence[int], grid_size: int = 512) -> torch.Tensor:
    """The whole-latent-pixel shift (dy, dx) at which `warp_latents` samples each frame of a translation path on
    (h, w) latents of any dtype (the warp samples in fp32): path (f, 2, 3) → (f, 2) float64. Nearest sampling
    rounds λ·k·δ·w/grid_size to a whole latent pixel, so the content moves in whole latent pixels (by minus this
    shift); where λ·δ·w/grid_size is not a whole number, frame to frame it moves by the two whole numbers around
    it, not by λ·δ·w/grid_size.

    Read off the warp itself: ramps of the row and column indices are warped and read at the corner the samples
    move away from, where none is reflected (so λ·k·|δ|·w/grid_size must stay within w − 1, h − 1)."""
    if path.ndim != 3 or path.shape[1:] != (2, 3):
        raise ValueError(f"path must be (f, 2, 3), got {tuple(path.shape)}")
    if not torch.equal(path[:, :, :2], torch.eye(2, dtype=path.dtype).expand(len(path), 2, 2)):
        raise ValueError("applied_shifts takes a translation path (A = I in every frame)")
    h, w = (int(v) for v in size)
    b = path[:, :, 2]  # (f, 2): (bx, by) on the reference grid
    for axis, n in ((0, w), (1, h)):
        if (b[:, axis] > 0).any() and (b[:, axis] < 0).any():
            raise ValueError("applied_shifts needs the path to move one way along each axis (a translation λ·k·δ)")
        if (b[:, axis].abs() * n / grid_size > n - 1).any():
            raise ValueError(f"the path shifts the {h}×{w} latents by a whole frame or more; no shift can be read off")
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    warped = warp_latents(torch.stack([ys, xs])[None].expand(len(path), 2, h, w), path, grid_size)
    y0 = 0 if (b[:, 1] >= 0).all() else h - 1
    x0 = 0 if (b[:, 0] >= 0).all() else w - 1
    return warped[:, :, y0, x0].double() - torch.tensor([y0, x0], dtype=_F64)


def sampling_grid(
    path: torch.Tensor, size: Sequence[int], grid_size: int = 512, dtype=torch.float32, device=None
) -> torch.Tensor:
    """`grid_sample` grid (f, h, w, 2) in [−1, 1] for a path (f, 2, 3): A·p + b on the reference grid, resized.

    The reference grid holds integer p = 0…g−1 normalised as p/g·2 − 1, while bilinear resizing reads its values
    as pixel centres: every sample lands half a grid pixel (w/1024 latent pixels in x) before the latent pixel's
    centre. Kept for parity. With nearest sampling it rounds shifts of a half latent pixel down: λ = 12 at
    w = 64 (1.5 latent pixels a frame) moves frames 1…4 by 1, 3, 4, 6 pixels.

    `dtype`: fp32 (what `warp_latents` uses for latents of any dtype up to fp32) or fp64; fp16 and bf16 are
    refused, as they cannot hold the grid's coordinates (`warp_latents`). The path's numbers reach the kernels as
    Python scalars (cast to `dtype`, as a path tensor in `dtype` would be), so no tensor is copied to `device`.
    """
    if int(grid_size) != grid_size or grid_size < 1:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sampling grid dtype {dtype}: use torch.float32 or torch.float64; half precision cannot "
                         "hold the grid's coordinates to a latent pixel (warp_latents samples fp16/bf16 in fp32)")
    axis = torch.arange(grid_size, device=device).to(dtype)
    y, x = torch.meshgrid(axis, axis, indexing="ij")  # (g, g) each, as RAFT's coords_grid
    grids = []
    for (a00, a01, b0), (a10, a11, b1) in path.tolist():  # one frame at a time: a g² field per frame is 2 MiB in
        coords = torch.stack([a00 * x + a01 * y + b0,  # fp32 at g = 512, so memory stays flat as the video grows;
                              a10 * x + a11 * y + b1])  # (2, g, g): 1·x + 0·y + b rounds as x + b
        coords = coords / grid_size * 2.0 - 1.0
        grids.append(F.interpolate(coords[None], size=tuple(size), mode="bilinear")[0].permute(1, 2, 0))
    return torch.stack(grids) if grids else torch.empty(0, *size, 2, device=device, dtype=dtype)
