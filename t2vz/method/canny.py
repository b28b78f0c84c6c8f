"""Canny edge maps (Canny 1986, "A Computational Approach to Edge Detection") for canny ControlNets, in plain
torch and batched over frames. It follows OpenCV's `cv2.Canny(img, low, high)` (aperture 3, L2gradient=False),
which the ControlNet annotators and T2V-Zero's `pre_process_canny` call on each uint8 frame:

    1. intensity: frames → uint8 scale (round(255·x)), then ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B in
       OpenCV's fixed point ("gray"), or each RGB channel on its own ("rgb", see below);
    2. gradient: 3×3 Sobel gx, gy on the image padded by replicating its edge pixels (cv2.Canny's
       BORDER_REPLICATE); no Gaussian blur beforehand: cv2.Canny does none;
    3. magnitude m = |gx| + |gy| (L1 norm);
    4. non-maximum suppression: keep m where it is a maximum across the edge, the gradient direction quantised
       to 0°, 45°, 90°, 135° with cv2's tan 22.5° test and its tie-break (m > previous, m ≥ next along 0° and 90°;
       strictly greater on both sides along the diagonals); magnitudes outside the image count as 0;
    5. double threshold (thresholds floored to integers, as cv2): strong where m > high, candidate where m > low;
    6. hysteresis: candidates 8-connected through candidates to a strong pixel become edges.

Border: the outermost pixels can be edges, as in cv2 (an edge that leaves the frame reaches its last pixel). The
replicated padding makes the gradient across the image border itself 0, so the frame's border is never an edge
by itself; a pixel's neighbours beyond the border have magnitude 0 in step 4.

Channels: `channels="rgb"` (the default) is cv2.Canny on the 3-channel frame, which is what T2V-Zero and
diffusers' examples do: per pixel the
channel with the largest magnitude (the first on ties) gives gx, gy and m. `channels="gray"` runs Canny on the
luma (cv2.Canny on a grayscale image). On gray frames (R = G = B) both agree.

Only canny is shipped: pose (OpenPose) and depth (MiDaS) detectors are networks whose weights t2vz cannot ship,
so pose and depth controls are given as ready-made videos (or frames) of the detector's output.
Axis letters: f frames, c channels, h w spatial.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CANNY_CHANNELS = ("gray", "rgb")

# cv2's fixed-point RGB → gray (Q14): 0.299, 0.587, 0.114 · 2¹⁴, rounded; they sum to 2¹⁴.
_GRAY_Q14 = (4899, 9617, 1868)
# cv2.Canny's sector test: |gy|·2¹⁵ against |gx|·tan 22.5°·2¹⁵ and |gx|·tan 67.5°·2¹⁵ (= tan 22.5° + 2).
_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)
_TG67 = _TG22 + (2 << _SHIFT)
# Dilation steps between two convergence checks of the hysteresis (each check is a device sync).
_STEPS_PER_CHECK = 8


def _threshold(name: str, value: float) -> float:
    """float(value), or a ValueError naming the value when it is NaN, infinite or negative."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0 on the 0..255 intensity scale, got {value}")
    return value


def intensity(frames: torch.Tensor, channels: str = "gray") -> torch.Tensor:
    """Step 1: frames (f, h, w, 3) float in [0, 1] → (f, c, h, w) float32 integers in 0..255; c = 1 ("gray") or 3.

    Frames are quantised to uint8 as cv2 sees them (round(255·x), clamped); "gray" is cv2's RGB2GRAY in fixed
    point, (4899 R + 9617 G + 1868 B + 2¹³) >> 14, exact in float32 (all values < 2²⁴).
    """
    rgb = (frames.float() * 255).round().clamp(0, 255).permute(0, 3, 1, 2)
    if channels == "rgb":
        return rgb
    weights = rgb.new_tensor(_GRAY_Q14).view(1, 3, 1, 1)
    return torch.floor(((rgb * weights).sum(1, keepdim=True) + (1 << 13)) / (1 << 14))


def sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: 3×3 Sobel gradients with replicated borders: (n, c, h, w) → gx, gy (n, c, h, w).

    gx = [1 2 1]ᵀ ⊗ [−1 0 1] (right minus left), gy its transpose (below minus above), as cv2.Sobel(…, 1, 0, 3).
    """
    n, c, h, w = image.shape
    smooth, diff = image.new_tensor([1.0, 2.0, 1.0]), image.new_tensor([-1.0, 0.0, 1.0])
    kernels = torch.stack([torch.outer(smooth, diff), torch.outer(diff, smooth)])[:, None]  # (2, 1, 3, 3)
    padded = F.pad(image.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(padded, kernels).reshape(n, c, 2, h, w)
    return grad[:, :, 0], grad[:, :, 1]


def non_maximum_suppression(gx: torch.Tensor, gy: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Step 4: where m is a maximum along the quantised gradient direction; gx, gy, m (f, h, w) → bool (f, h, w).

    gx, gy hold integers (exact in float32); the sector test runs in int64 as cv2's does in int.
    """
    ax, ay = gx.abs().long(), gy.abs().long() << _SHIFT
    horizontal = ay < ax * _TG22  # gradient within 22.5° of the x axis: compare left and right
    vertical = ~horizontal & (ay > ax * _TG67)  # within 22.5° of the y axis: compare above and below
    same_sign = (gx > 0) == (gy > 0)  # diagonal sectors have gx, gy ≠ 0: gradient along (1, 1) or (1, −1)

    m = magnitude
    p = F.pad(m, (1, 1, 1, 1))  # magnitudes beyond the border are 0, as in cv2
    left, right, above, below = p[:, 1:-1, :-2], p[:, 1:-1, 2:], p[:, :-2, 1:-1], p[:, 2:, 1:-1]
    above_left, above_right, below_left, below_right = p[:, :-2, :-2], p[:, :-2, 2:], p[:, 2:, :-2], p[:, 2:, 2:]
    along_x = (m > left) & (m >= right)
    along_y = (m > above) & (m >= below)
    along_diagonal = torch.where(same_sign, (m > above_left) & (m > below_right), (m > above_right) & (m > below_left))
    return torch.where(horizontal, along_x, torch.where(vertical, along_y, along_diagonal))


def hysteresis(strong: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Step 6: candidates 8-connected through candidates to a strong pixel; bool (f, h, w) → bool (f, h, w).

    Grows the strong set by 3×3 max-pool dilation restricted to the candidates until it stops changing.
    """
    edges, allowed = strong.float()[:, None], candidate.float()[:, None]
    while True:
        previous = edges
        for _ in range(_STEPS_PER_CHECK):
            edges = F.max_pool2d(edges, 3, stride=1, padding=1) * allowed
        if torch.equal(edges, previous):
            return edges[:, 0] > 0


def canny_edges(frames: torch.Tensor, low_threshold: float = 100, high_threshold: float = 200, *,
                channels: str = "rgb") -> torch.Tensor:
    """Canny edge map of each frame, as cv2.Canny(frame_uint8, low_threshold, high_threshold).

    frames (f, h, w, 3) or one image (h, w, 3), float in [0, 1] → the same shape, float32 on frames' device,
    1.0 on edges and 0.0 elsewhere, replicated on the 3 channels (white edges on black, as canny ControlNets take).
    Thresholds are on the 0..255 intensity scale, applied to m = |gx| + |gy| of the 3×3 Sobel gradients (whose
    largest value is 4·255·2): strong where m > high_threshold, kept where m > low_threshold and connected to a
    strong edge. `channels`: "gray" (luma) or "rgb" (the strongest channel per pixel, cv2 on a colour frame).
    """
    low = _threshold("low_threshold", low_threshold)
    high = _threshold("high_threshold", high_threshold)
    if low > high:
        raise ValueError(f"low_threshold ({low}) must not exceed high_threshold ({high})")
    if channels not in CANNY_CHANNELS:
        raise ValueError(f"channels={channels!r} is not one of {CANNY_CHANNELS}")
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"frames must be a torch.Tensor (f, h, w, 3) float in [0, 1], got {type(frames).__name__}")
    single = frames.dim() == 3
    if frames.dim() not in (3, 4) or frames.shape[-1] != 3 or frames.shape[-2] < 1 or frames.shape[-3] < 1:
        raise ValueError(f"frames must be (f, h, w, 3) or (h, w, 3) with h, w ≥ 1, got shape {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be float in [0, 1], got dtype {frames.dtype}; divide uint8 frames by 255")
    if not bool(torch.isfinite(frames).all()):
        raise ValueError("frames contain NaN or infinite values")
    video = frames[None] if single else frames
    if video.shape[0] == 0:
        return torch.zeros(frames.shape, dtype=torch.float32, device=frames.device)

    gx, gy = sobel(intensity(video, channels))  # (f, c, h, w) each
    magnitude = gx.abs() + gy.abs()
    strongest = magnitude.argmax(dim=1, keepdim=True)  # cv2 on c > 1 channels: the first largest magnitude
    gx, gy, magnitude = (t.gather(1, strongest)[:, 0] for t in (gx, gy, magnitude))

    # cv2 floors the thresholds; m holds integers, so m > ⌊t⌋ is m > t.
    candidate = non_maximum_suppression(gx, gy, magnitude) & (magnitude > math.floor(low))
    edges = hysteresis(candidate & (magnitude > math.floor(high)), candidate)

    out = edges.float()[..., None].expand(*edges.shape, 3).contiguous()
    return out[0] if single else out
