"""Motion dynamics in the latents (T2V-Zero Sec. 3.3, Algorithm 1 step 3): bitwise parity of translation with
diffusers' `create_motion_field_and_warp_latents` (the oracle), and exact pixel positions for every kind of path.

Screen convention: x right, y down; a path samples at A·p + b, so the content moves by the inverse map.
"""
from __future__ import annotations

import math

import pytest
import torch

from t2vz.method.motion import (
    applied_shifts,
    compose,
    offsets_path,
    rotation_path,
    sampling_grid,
    translation_path,
    warp_latents,
    zoom_path,
)

SIZES = [(64, 64), (40, 72)]


def _reference():
    """diffusers' T2V-Zero pipeline module (imported lazily: it pulls in transformers)."""
    from diffusers.pipelines.deprecated.text_to_video_synthesis import pipeline_text_to_video_zero as module

    return module


def _dot(h: int, w: int, row: int, col: int, frames: int = 1) -> torch.Tensor:
    """Latents (frames, 1, h, w): zero with one bright pixel at (row, col)."""
    x = torch.zeros(frames, 1, h, w)
    x[:, 0, row, col] = 1.0
    return x


def _bright(frame: torch.Tensor) -> list[tuple[int, int]]:
    """(row, col) of every bright pixel of one frame (1, h, w)."""
    return [tuple(rc) for rc in (frame[0] > 0.5).nonzero().tolist()]


# (λ, δ, frame ids): λ = 0, fractional, the default 12, large; negative and non-unit δ; chunks not starting at 0.
CASES = [
    (0.0, (1.0, 1.0), [1, 2]),
    (3.5, (-1.0, 0.5), [1, 2, 3]),
    (12.0, (1.0, 1.0), [5, 6, 7]),
    (12.0, (-1.0, -1.0), [9, 10]),
    (40.0, (0.3, -2.7), [2, 3]),
]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("lam,direction,ids", CASES)
def test_translation_bitwise_equals_reference(h, w, lam, direction, ids):
    """Bitwise (torch.equal): warp_latents(translation_path) == create_motion_field_and_warp_latents(λδx, λδy)."""
    x = torch.randn(len(ids), 4, h, w)
    expected = _reference().create_motion_field_and_warp_latents(lam * direction[0], lam * direction[1], ids, x)
    actual = warp_latents(x, translation_path(ids, lam, direction))
    assert torch.equal(actual, expected), f"max |diff| {(actual - expected).abs().max().item()}"


def _chosen_pixels(n: int, dtype: torch.dtype, lam: float, ids: list[int]) -> torch.Tensor:
    """(f, 2, n, n): the (row, col) of the source pixel each latent pixel of an n×n warp of `dtype` copies, read
    off by warping ramps of the row and column indices (n ≤ 256: bf16 holds the integers 0…256 exactly)."""
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    ramps = torch.stack([rows, cols]).to(dtype)[None].expand(len(ids), 2, n, n)
    assert torch.equal(ramps.long(), torch.stack([rows, cols]).expand_as(ramps)), "the ramps must be exact"
    return warp_latents(ramps, translation_path(ids, lam, (1.0, 1.0))).long()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 128])  # SD 1.5 at 512², SDXL at 1024²
@pytest.mark.parametrize("lam", [12.0, 7.3])
def test_low_precision_warp_samples_the_fp32_pixels(dtype, n, lam):
    """fp16 and bf16 latents are moved exactly as fp32 ones: every latent pixel copies the same source pixel.
    With the grid in the latents' dtype (the references' way) bf16 picked another pixel for 37% of them at 64²,
    λ = 12, and fp16 for 11% at 128², λ = 7.3 (4 frames, δ = (1, 1))."""
    ids = [0, 1, 2, 3]
    expected = _chosen_pixels(n, torch.float32, lam, ids)
    actual = _chosen_pixels(n, dtype, lam, ids)
    off = (actual != expected).any(1)
    assert not off.any(), f"{off.float().mean():.1%} of latent pixels sampled elsewhere than in fp32"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_warp_equals_the_reference_in_fp32(dtype):
    """fp16/bf16 latents warp bitwise as the reference warps their fp32 copy (cast back), not as the reference
    warps them in their own dtype: that one moves bf16 frames by the wrong whole pixels (asserted here, so the
    test shows the difference it guards)."""
    ids = [1, 2, 3, 4]
    x = torch.randn(len(ids), 4, 64, 64).to(dtype)
    for lam, (dx, dy) in [(12.0, (1.0, 1.0)), (7.3, (-0.4, 1.9))]:
        in_fp32 = _reference().create_motion_field_and_warp_latents(lam * dx, lam * dy, ids, x.float()).to(dtype)
        actual = warp_latents(x, translation_path(ids, lam, (dx, dy)))
        assert actual.dtype == dtype
        assert torch.equal(actual, in_fp32), f"λ={lam}: max |diff| {(actual - in_fp32).abs().max().item()}"
    in_bf16 = _reference().create_motion_field_and_warp_latents(12.0, 12.0, ids, x.bfloat16())
    assert not torch.equal(in_bf16, warp_latents(x.bfloat16(), translation_path(ids, 12.0)))


def test_sampling_grid_refuses_half_precision_and_fp64_latents_warp_in_fp64():
    """The grid is fp32 or fp64: fp64 latents warp in fp64, bitwise as the reference warps them."""
    with pytest.raises(ValueError, match="bfloat16"):
        sampling_grid(translation_path([1, 2], 12.0), (8, 8), dtype=torch.bfloat16)
    ids = [1, 2]
    x = torch.randn(len(ids), 4, 40, 72, dtype=torch.float64)
    expected = _reference().create_motion_field_and_warp_latents(12.0, 12.0, ids, x)
    warped = warp_latents(x, translation_path(ids, 12.0))
    assert warped.dtype == torch.float64 and torch.equal(warped, expected)


def test_sampling_grid_bitwise_equals_reference(monkeypatch):
    """The grid itself (not only its nearest-rounded use) equals the one the reference hands to grid_sample."""
    module = _reference()
    captured = []

    def spy(latent, grid, **kwargs):
        captured.append(grid)
        return torch.nn.functional.grid_sample(latent, grid, **kwargs)

    monkeypatch.setattr(module, "grid_sample", spy)
    ids, lam, (dx, dy) = [2, 5, 11], 3.3, (0.7, -1.3)
    module.create_motion_field_and_warp_latents(lam * dx, lam * dy, ids, torch.randn(len(ids), 4, 40, 72))
    expected = torch.cat(captured)
    assert torch.equal(sampling_grid(translation_path(ids, lam, (dx, dy)), (40, 72)), expected)


def test_frame_zero_and_identity_paths_return_the_input():
    """Frame 0 (and λ = 0, zoom/rotation at k = 0) is not moved: the output equals the input exactly."""
    x = torch.randn(1, 4, 40, 72)
    for path in (translation_path([0], 12.0), zoom_path([0], 0.3), rotation_path([0], 30.0), offsets_path([(0, 0)])):
        assert torch.equal(warp_latents(x, path), x)


@pytest.mark.parametrize("n", [1, 3])
def test_translation_moves_content_left_and_up_at_non_square_size(n):
    """δ = (1, 0) with λ = 512/w·n moves a pixel LEFT by n·k latent pixels; δ = (0, 1), λ = 512/h·n, UP by n·k."""
    h, w, row, col = 40, 72, 20, 30
    ids = [0, 1, 2]
    x = _dot(h, w, row, col, frames=3)
    left = warp_latents(x, translation_path(ids, 512 / w * n, (1.0, 0.0)))
    up = warp_latents(x, translation_path(ids, 512 / h * n, (0.0, 1.0)))
    for k in ids:
        assert _bright(left[k]) == [(row, col - n * k)]
        assert _bright(up[k]) == [(row - n * k, col)]


def test_reference_half_pixel_offset_rounds_half_shifts_down():
    """The reference samples half a 512-grid pixel early: λ = 12 at w = 64 (1.5 px/frame) shifts by 1, 3, 4, 6."""
    out = warp_latents(_dot(64, 64, 32, 20, frames=5), translation_path(range(5), 12.0, (1.0, 0.0)))
    assert [_bright(frame)[0][1] for frame in out] == [20, 19, 17, 16, 14]


@pytest.mark.parametrize("lam,direction", [(12.0, (1.0, 0.0)), (12.0, (-1.0, 0.5)), (32.0, (1.0, 1.0)),
                                           (64.0, (0.0, -1.0)), (64.0, (1.0, 1.0))])
def test_applied_shifts_are_where_the_warp_moved_a_dot(lam, direction):
    """applied_shifts matches the warp itself: a dot in the corner the content moves away from lands at its
    position minus the shift in every frame, up to λ = 64 (2 latent pixels a frame, 14 by frame 8 of 16); the
    reflection padding may show a mirrored copy of it too."""
    h = w = 16
    path = translation_path(range(8), lam, direction)
    shifts = applied_shifts(path, (h, w))
    row = 15 if direction[1] > 0 else 0
    col = 15 if direction[0] > 0 else 0
    out = warp_latents(_dot(h, w, row, col, frames=8), path)
    for k in range(8):
        assert (row - int(shifts[k, 0]), col - int(shifts[k, 1])) in _bright(out[k]), (k, shifts[k])


def test_applied_shifts_round_fractional_motion_to_whole_latent_pixels():
    """λ = 12 on 16 latent pixels asks 0.375 of a pixel a frame; nearest sampling moves 0 or 1 pixel from frame
    to frame (3 in 7 frames where 2.625 were asked); λ = 32 is exactly 1 a frame."""
    fractional = applied_shifts(translation_path(range(8), 12.0, (1.0, 0.0)), (16, 16))
    assert fractional[:, 1].tolist() == [0, 0, 1, 1, 1, 2, 2, 3] and not fractional[:, 0].any()
    whole = applied_shifts(translation_path(range(8), 32.0, (1.0, 1.0)), (16, 16))
    assert whole.tolist() == [[k, k] for k in range(8)]
    with pytest.raises(ValueError, match="translation path"):
        applied_shifts(zoom_path(range(3), 1.1), (16, 16))
    with pytest.raises(ValueError, match="whole frame"):
        applied_shifts(translation_path(range(8), 96.0, (1.0, 0.0)), (16, 16))  # 3 a frame: 21 of 16


def test_zoom_keeps_the_centre_and_pushes_pixels_outward():
    """Zoom ×2 (rate 1, k = 1) at 40×72: a 2×2 block on the centre becomes the centred 4×4 block; a pixel 14.5 px
    right of the centre lands 29 px right of it (2×2 px); rate < 0 pulls the pixel inward instead."""
    h, w = 40, 72  # centre at row 20, col 36 (between pixels)
    block = torch.zeros(1, 1, h, w)
    block[0, 0, 19:21, 35:37] = 1.0
    grown = warp_latents(block, zoom_path([1], 1.0))
    assert _bright(grown[0]) == [(r, c) for r in range(18, 22) for c in range(34, 38)]
    assert _bright(warp_latents(_dot(h, w, 20, 50), zoom_path([1], 1.0))[0]) == [(20, 64), (20, 65), (21, 64), (21, 65)]
    inward = _bright(warp_latents(_dot(h, w, 20, 60), zoom_path([1], -0.5))[0])  # ×½: 24.5 px right → ~12
    assert inward and all(r == 20 and 47 <= c <= 49 for r, c in inward), inward


def test_zoom_scale_compounds_per_frame():
    """s_k = (1 + rate)^k: the linear part of frame k is (1 + rate)^−k · I."""
    a = zoom_path([0, 1, 2, 3], 0.1)[:, :, :2]
    expected = (1.1 ** -torch.arange(4.0, dtype=torch.float64))[:, None, None] * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(a, expected, rtol=1e-15, atol=0)


def test_zoom_and_rotation_fix_the_grid_centre():
    """The centre (256, 256) of the 512 grid (the image's middle in grid_sample's edge convention) maps to itself."""
    c = torch.tensor([256.0, 256.0, 1.0], dtype=torch.float64)
    for path in (zoom_path([1, 2, 5], 0.2), rotation_path([1, 3], 37.0), rotation_path([2], 50.0, aspect=1.8)):
        torch.testing.assert_close(path @ c, c[:2].expand(len(path), 2), rtol=0, atol=1e-12)


def test_rotation_turns_content_counter_clockwise_on_screen():
    """90°: a pixel right of the centre goes above it (y down); 180°: to the left; 360°: back to the input."""
    # 64×64, centre (32, 32); pixel (32, 44) has centre offset (dx, dy) = (12.5, 0.5) → (0.5, −12.5) → (19, 32).
    assert _bright(warp_latents(_dot(64, 64, 32, 44), rotation_path([1], 90.0))[0]) == [(19, 32)]
    assert _bright(warp_latents(_dot(64, 64, 32, 44), rotation_path([2], 90.0))[0]) == [(31, 19)]
    x = torch.randn(1, 4, 64, 64)
    assert torch.equal(warp_latents(x, rotation_path([4], 90.0)), x)


def test_rotation_with_aspect_is_rigid_on_a_non_square_screen():
    """40×72 with aspect = w/h: a 2×2 block 15 px right of the centre (20, 36) goes 15 px above it at 90°. With
    the default aspect 1 the rotation is rigid on the square grid: it lands 15·h/w ≈ 8.3 px above, as a 4×1 bar."""
    block = torch.zeros(1, 1, 40, 72)
    block[0, 0, 19:21, 50:52] = 1.0
    rigid = _bright(warp_latents(block, rotation_path([1], 90.0, aspect=72 / 40))[0])
    assert rigid == [(4, 35), (4, 36), (5, 35), (5, 36)]
    squashed = _bright(warp_latents(block, rotation_path([1], 90.0))[0])
    assert squashed == [(11, 34), (11, 35), (11, 36), (11, 37)]


def test_offsets_path_equals_the_corresponding_translations():
    """[(0,0), (24,0), (24,−16)] is the per-frame translation path, and warps bitwise as the reference does."""
    offsets = [(0.0, 0.0), (24.0, 0.0), (24.0, -16.0)]
    path = offsets_path(offsets)
    expected = torch.cat([translation_path([0], 5.0), translation_path([1], 24.0, (1, 0)),
                          translation_path([2], 8.0, (1.5, -1.0))])
    assert torch.equal(path, expected)
    x = torch.randn(3, 4, 40, 72)
    reference = torch.cat([_reference().create_motion_field_and_warp_latents(dx, dy, [1], x[k : k + 1])
                           for k, (dx, dy) in enumerate(offsets)])
    assert torch.equal(warp_latents(x, path), reference)


def test_compose_chains_motions_in_order():
    """compose(a, b) moves the content by a, then by b: translations add; rotate-then-shift ≠ shift-then-rotate."""
    ids = [0, 1, 2]
    summed = compose(translation_path(ids, 3.0, (1, 0)), translation_path(ids, 2.0, (0, -1)))
    assert torch.equal(summed, translation_path(ids, 1.0, (3, -2)))
    rotate, shift = rotation_path([1], 90.0), offsets_path([(-80.0, 0.0)])  # content shifts 10 px right
    dot = _dot(64, 64, 32, 44)
    assert _bright(warp_latents(dot, compose(rotate, shift))[0]) == [(19, 42)]  # up to (19, 32), then right
    assert _bright(warp_latents(dot, compose(shift, rotate))[0]) == [(9, 32)]  # right to (32, 54), then up


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: translation_path([1], math.nan), "nan"),
        (lambda: translation_path([1], math.inf), "inf"),
        (lambda: translation_path([1], 12.0, (1.0, 1.0, 0.0)), "3"),
        (lambda: translation_path([1], 12.0, (1.0, math.nan)), "direction"),
        (lambda: offsets_path([(1.0, 2.0), (3.0,)]), "offsets"),
        (lambda: zoom_path([1], -1.0), "-1.0"),
        (lambda: rotation_path([1], math.inf), "inf"),
        (lambda: warp_latents(torch.zeros(3, 4, 8, 8), translation_path([1, 2], 12.0)), r"\(2, 2, 3\)"),
        (lambda: warp_latents(torch.zeros(1, 3, 4, 8, 8), translation_path([1], 12.0)), r"\(1, 3, 4, 8, 8\)"),
        (lambda: warp_latents(torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 3)), r"\(1, 3, 3\)"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
