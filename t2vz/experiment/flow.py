"""Optical-flow warp error (Lai et al., "Learning Blind Video Temporal Consistency", ECCV 2018, Sec. 5.1), the
temporal-consistency metric later video-editing and text-to-video papers report.

For each pair of consecutive frames I_t, I_{t+1} (float (h, w, 3) in [0, 1]):
  1. the flow both ways with OpenCV's DIS optical flow (Kroeger et al. 2016; `opencv-python-headless`, no weights):
     F_b from I_{t+1} to I_t and F_f from I_t to I_{t+1}, on the frames' grey levels;
  2. Î_t = W(I_t, F_b): I_t sampled at x + F_b(x) for every pixel x of I_{t+1} (bilinear), so Î_t is I_t moved
     onto I_{t+1};
  3. the non-occlusion mask M: x is kept where the flows agree (forward–backward consistency, Sundaram et al.
     2010, the test Lai et al. take from Ruder et al. 2016),
         |F_b(x) + F_f(x + F_b(x))|² < 0.01 (|F_b(x)|² + |F_f(x + F_b(x))|²) + 0.5,
     and where x + F_b(x) lies inside I_t (content that entered at the border has nothing to be warped from);
  4. E_warp(t) = Σ_x M(x) ‖I_{t+1}(x) − Î_t(x)‖² / Σ_x M(x), the squared RGB distance over kept pixels.
The video's warp error is the mean of E_warp over its frame pairs (`flow_warp_error`). Lai et al. compute the flow
with FlowNet2; DIS is a fast classical method that needs nothing downloaded, so absolute values differ from theirs,
comparisons between methods measured here do not.

`metrics.warp_error`, the model-free one, aligns frames by one global translation (phase correlation): right for
the global motion T2V-Zero's warp makes, blind to local motion. Use `flow_warp_error` for videos whose content moves
locally (edits, real footage) and to compare with published numbers' protocol (docs/experiments.md, Metrics).
"""
from __future__ import annotations

import numpy as np
import torch

CONSISTENCY_RELATIVE = 0.01   # the forward–backward test's α₁ (Sundaram et al.; Ruder et al.; Lai et al.)
CONSISTENCY_ABSOLUTE = 0.5    # its α₂, in pixels²


def _grey_u8(frame: np.ndarray) -> np.ndarray:
    """(h, w, 3) float in [0, 1] → (h, w) uint8 grey (ITU-R BT.601 weights), what DIS reads."""
    grey = frame @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)


def dis_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The optical flow from frame a to frame b (each (h, w, 3) float in [0, 1]) with OpenCV's DIS, medium preset:
    (h, w, 2) float32, flow[y, x] = (dx, dy) such that a(x, y) is seen at b(x + dx, y + dy)."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(_grey_u8(a), _grey_u8(b), None)


def _sample(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """image (h, w, c) sampled bilinearly at float positions x, y (h, w), clamped to the border: (h, w, c)."""
    h, w = image.shape[:2]
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def warp_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1 to 3 for frames a = I_t, b = I_{t+1} ((h, w, 3) float in [0, 1]): (Î_t, the warped a on b's grid
    (h, w, 3); M, the non-occlusion mask (h, w) bool)."""
    backward, forward = dis_flow(b, a), dis_flow(a, b)
    h, w = a.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    x_src, y_src = xs + backward[..., 0], ys + backward[..., 1]
    warped = _sample(a, x_src, y_src)
    forward_at_src = _sample(forward, x_src, y_src)
    round_trip = backward + forward_at_src
    consistent = (round_trip ** 2).sum(-1) < CONSISTENCY_RELATIVE * ((backward ** 2).sum(-1)
                                                                     + (forward_at_src ** 2).sum(-1)) \
        + CONSISTENCY_ABSOLUTE
    inside = (x_src >= 0) & (x_src <= w - 1) & (y_src >= 0) & (y_src <= h - 1)
    return warped, consistent & inside


def pair_warp_error(a: np.ndarray, b: np.ndarray) -> float:
    """E_warp of one frame pair (step 4); NaN when every pixel is masked."""
    warped, mask = warp_pair(a, b)
    if not mask.any():
        return float("nan")
    return float(((b - warped) ** 2).sum(-1)[mask].mean())


def flow_warp_error(frames) -> float:
    """The video's optical-flow warp error: the mean E_warp over consecutive frame pairs (module docstring) of
    frames (f, h, w, 3), a float tensor or array in [0, 1] (uint8 accepted); NaN for fewer than two frames."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().float().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3), got {tuple(frames.shape)}")
    frames = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
    if len(frames) < 2:
        return float("nan")
    errors = [pair_warp_error(frames[k], frames[k + 1]) for k in range(len(frames) - 1)]
    errors = [e for e in errors if np.isfinite(e)]
    return float(np.mean(errors)) if errors else float("nan")
