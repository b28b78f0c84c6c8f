"""The optical-flow warp error (`t2vz.experiment.flow`, Lai et al. 2018) on synthetic videos of known motion: a
translated and a rotated texture."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from t2vz.experiment.flow import _sample, dis_flow, flow_warp_error, pair_warp_error, warp_pair

SIZE = 96


def texture(seed: int = 0, size: int = 256) -> np.ndarray:
    """A smooth random colour texture (h, w, 3) in [0, 1]: white noise blurred at two scales."""
    import cv2

    noise = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)
    smooth = 0.6 * cv2.GaussianBlur(noise, (0, 0), 3.0) + 0.4 * cv2.GaussianBlur(noise, (0, 0), 1.5)
    smooth -= smooth.min()
    return smooth / smooth.max()


def translated(velocity: tuple[int, int], frames: int = 4) -> np.ndarray:
    """Crops of one big texture whose content moves by velocity = (vx, vy) whole pixels a frame: frame k shows
    T(x − k·vx, y − k·vy), new content entering at the border it moves away from. (f, SIZE, SIZE, 3)."""
    big, (vx, vy), start = texture(), velocity, 80
    return np.stack([big[start - k * vy:start - k * vy + SIZE, start - k * vx:start - k * vx + SIZE]
                     for k in range(frames)])


def rotated(degrees: float, frames: int = 3) -> tuple[np.ndarray, float]:
    """The texture turned by `degrees` a frame about the frame's centre: frame k(x) = T(R(−kθ)(x − c) + c + o)."""
    big = texture(1)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    c = (SIZE - 1) / 2
    out = []
    for k in range(frames):
        a = math.radians(-k * degrees)
        x = math.cos(a) * (xs - c) - math.sin(a) * (ys - c) + c + 80
        y = math.sin(a) * (xs - c) + math.cos(a) * (ys - c) + c + 80
        out.append(_sample(big, x, y))
    return np.stack(out).astype(np.float32), math.radians(degrees)


def test_translation_flow_warp_and_the_entering_border():
    video = translated((3, -2))
    a, b = video[0], video[1]
    backward = dis_flow(b, a)  # from I_{t+1} to I_t: every pixel came from x − v
    interior = backward[8:-8, 8:-8].reshape(-1, 2)
    np.testing.assert_allclose(np.median(interior, axis=0), [-3.0, 2.0], atol=0.05)
    assert np.abs(interior - [-3.0, 2.0]).max(axis=1).mean() < 0.2
    warped, mask = warp_pair(a, b)
    assert not mask[:, :3].any() and not mask[-2:, :].any()  # the content that entered has no source
    assert mask[8:-8, 8:-8].mean() > 0.99
    assert flow_warp_error(video) < 5e-5  # measured 4.1e-6
    unrelated = np.stack([texture(seed)[:SIZE, :SIZE] for seed in range(3)])  # nothing moves into anything
    assert flow_warp_error(unrelated) > 0.02  # measured 0.084


def test_rotation_flow_matches_the_analytic_field():
    video, theta = rotated(2.0)
    c = (SIZE - 1) / 2
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    # frame k+1(x) = frame k(R(−θ)(x − c) + c): the backward flow is R(−θ)(x − c) + c − x
    expected = np.stack([math.cos(-theta) * (xs - c) - math.sin(-theta) * (ys - c) + c - xs,
                         math.sin(-theta) * (xs - c) + math.cos(-theta) * (ys - c) + c - ys], axis=-1)
    flow = dis_flow(video[1], video[0])
    error = np.linalg.norm((flow - expected)[12:-12, 12:-12], axis=-1)
    assert error.mean() < 0.3, error.mean()
    assert flow_warp_error(video) < 5e-4  # measured 1.3e-4
    warped, mask = warp_pair(video[0], video[1])
    assert mask.mean() > 0.9


def test_inputs_and_edge_cases():
    video = translated((2, 0), frames=3)
    as_tensor = flow_warp_error(torch.from_numpy(video))
    assert as_tensor == pytest.approx(flow_warp_error(video))
    as_u8 = flow_warp_error(np.rint(video * 255).astype(np.uint8))
    assert as_u8 == pytest.approx(as_tensor, abs=1e-4)
    assert math.isnan(flow_warp_error(video[:1]))
    assert pair_warp_error(video[0], video[0]) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match=r"frames must have shape \(F, H, W, 3\), got \(3, 96, 96\)"):
        flow_warp_error(video[..., 0])
