"""Canny edge maps (t2vz.method.canny): hand-computed steps with cv2.Canny's tie-break, rectangles, a diagonal, the
thresholds and hysteresis, batching, the output format and argument checks.

A step of contrast c (0..255 scale) between two flat regions has Sobel magnitude m = |gx| + |gy| = 4c on the two
pixels beside it; anywhere, m ≤ 8·(max − min) (each Sobel kernel's positive weights sum to 4).
"""
import pytest
import torch

from t2vz.method.canny import canny_edges, intensity


def gray_image(values: torch.Tensor) -> torch.Tensor:
    """(h, w) intensities on the 0..255 scale → (h, w, 3) float frame in [0, 1] with R = G = B."""
    return (values.float() / 255)[..., None].expand(*values.shape, 3).clone()


def edges_of(image: torch.Tensor, **kwargs) -> torch.Tensor:
    """The edge map of one (h, w, 3) image as a bool (h, w)."""
    return canny_edges(image, **kwargs)[..., 0] > 0


def vertical_step(h: int, w: int, x0: int, left: float, right: float) -> torch.Tensor:
    values = torch.full((h, w), float(left))
    values[:, x0:] = right
    return values


def near(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Pixels within Chebyshev distance `radius` of mask (bool (h, w))."""
    k = 2 * radius + 1
    return torch.nn.functional.max_pool2d(mask.float()[None, None], k, stride=1, padding=radius)[0, 0] > 0


def rectangle_border(h: int, w: int, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """The outline pixels of the filled rectangle rows top..bottom-1, columns left..right-1."""
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    interior = torch.zeros(h, w, dtype=torch.bool)
    interior[top + 1 : bottom - 1, left + 1 : right - 1] = True
    return inside & ~interior


@pytest.mark.parametrize("left, right", [(0, 255), (255, 0), (30, 200)])
def test_vertical_step_gives_one_column_on_the_left_pixel(left, right):
    # Both columns beside the step have m = 4·|right − left|; cv2 keeps m > left neighbour and m ≥ right neighbour,
    # so the edge is the column just left of the step, the full height (borders included).
    edges = edges_of(gray_image(vertical_step(8, 10, 5, left, right)))
    expected = torch.zeros(8, 10, dtype=torch.bool)
    expected[:, 4] = True
    assert torch.equal(edges, expected)


def test_step_beside_the_border_marks_the_border_row():
    # cv2 pads by replicating (BORDER_REPLICATE): row 0 sees I[-1] = I[0], so rows 0 and 1 both have m = 4·255
    # and row 0 (above, strictly greater than the 0 beyond the border) is the edge. Reflect-101 padding would give
    # row 0 m = 0 and move the edge to row 1.
    values = torch.zeros(9, 6)
    values[1:] = 255
    expected = torch.zeros(9, 6, dtype=torch.bool)
    expected[0] = True
    assert torch.equal(edges_of(gray_image(values)), expected)
    assert torch.equal(edges_of(gray_image(values.T)), expected.T)


@pytest.mark.parametrize("top, bottom", [(0, 255), (255, 0)])
def test_horizontal_step_gives_one_row_above_the_step(top, bottom):
    values = torch.full((10, 7), float(top))
    values[6:] = bottom
    expected = torch.zeros(10, 7, dtype=torch.bool)
    expected[5] = True
    assert torch.equal(edges_of(gray_image(values)), expected)


def test_rectangle_border_found_all_round_and_thin():
    h, w, top, bottom, left, right = 40, 48, 9, 30, 12, 37
    values = torch.zeros(h, w)
    values[top:bottom, left:right] = 255
    edges = edges_of(gray_image(values))
    border = rectangle_border(h, w, top, bottom, left, right)
    assert edges.any()
    assert not (edges & ~near(border)).any(), "edge pixels farther than 1 px from the rectangle's border"
    found = (near(edges) & border).sum() / border.sum()
    assert found >= 0.95, f"only {found:.1%} of the border has an edge within 1 px"
    # thin: across each side, away from the corners, the ±2 px band holds at most 2 edge pixels (cv2: exactly 1)
    rows, cols = slice(top + 2, bottom - 2), slice(left + 2, right - 2)
    for band in (edges[rows, left - 2 : left + 2], edges[rows, right - 2 : right + 2]):
        assert (band.sum(1) <= 2).all() and (band.sum(1) >= 1).all()
    for band in (edges[top - 2 : top + 2, cols], edges[bottom - 2 : bottom + 2, cols]):
        assert (band.sum(0) <= 2).all() and (band.sum(0) >= 1).all()
    assert (edges[rows, left - 2 : left + 2].sum(1) == 1).all()


def test_diagonal_edge_found():
    n = 32
    y, x = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    inside = y > x + 3  # filled triangle below a 45° line
    edges = edges_of(gray_image(inside.float() * 255))
    boundary = inside & near(~inside) & (x > 0) & (y < n - 1)  # the triangle's pixels on the hypotenuse
    assert boundary.sum() > 20
    assert not (edges & ~near(boundary)).any(), "edge pixels farther than 1 px from the diagonal"
    found = (near(edges) & boundary).sum() / boundary.sum()
    assert found >= 0.95, f"only {found:.1%} of the diagonal has an edge within 1 px"
    # thin: each row crosses the 45° edge in at most 2 edge pixels
    assert (edges.sum(1) <= 2).all()


def test_constant_images_have_no_edges():
    for value in (0.0, 0.37, 1.0):
        assert not canny_edges(torch.full((2, 12, 16, 3), value)).any()


def test_rectangle_below_low_threshold_has_no_edges():
    low = 100
    contrast = low // 8  # m ≤ 8·contrast ≤ low, and a candidate needs m > low
    values = torch.full((24, 24), 100.0)
    values[6:18, 5:19] += contrast
    image = gray_image(values)
    assert not edges_of(image, low_threshold=low, high_threshold=low).any()
    # the same rectangle is found once the thresholds drop below its step magnitude 4·contrast
    assert edges_of(image, low_threshold=4 * contrast - 1, high_threshold=4 * contrast - 1).any()


def test_high_threshold_is_strict():
    # a lone step of magnitude m = 4c is strong only where m > high (cv2's convention), so it is all or nothing
    c = 50
    image = gray_image(vertical_step(8, 8, 4, 0, c))
    assert not edges_of(image, low_threshold=100, high_threshold=4 * c).any()
    assert edges_of(image, low_threshold=100, high_threshold=4 * c - 1)[:, 3].all()


def _weak_step_scene(touching: bool) -> tuple[torch.Tensor, int, int, int]:
    """Black left half; right half at the weak level `weak` in rows ≥ y0. With `touching`, rows < y0 of the right
    half are white, so the weak step's column continues a strong one; otherwise a white square far away gives a
    strong edge that does not touch it. Returns the image, the step column x0, y0, and the weak contrast."""
    h, w, x0, y0, weak = 32, 32, 16, 12, 40
    values = torch.zeros(h, w)
    values[:, x0:] = weak
    if touching:
        values[:y0, x0:] = 255
    else:
        values[3:8, 3:8] = 255
    return gray_image(values), x0, y0, weak


@pytest.mark.parametrize("touching", [True, False])
def test_hysteresis_keeps_weak_edges_only_when_connected(touching):
    low, high = 100, 200
    image, x0, y0, weak = _weak_step_scene(touching)
    assert low < 4 * weak <= high  # the weak step is a candidate, never strong on its own
    edges = edges_of(image, low_threshold=low, high_threshold=high)
    assert edges.any()  # the strong edge is there either way
    weak_rows = edges[y0 + 2 :, x0 - 2 : x0 + 2]  # across the weak step, away from the junction
    if touching:
        assert (weak_rows.sum(1) == 1).all(), "a weak edge connected to a strong one was dropped"
        # control: at m = low the weak step is no candidate (cv2 needs m > low), connected or not
        at_low = edges_of(image, low_threshold=4 * weak, high_threshold=high)
        assert not at_low[y0 + 2 :, x0 - 2 : x0 + 2].any()
    else:
        assert not weak_rows.any(), "an isolated weak edge was kept"
        # control: the same isolated step is kept once it counts as strong
        strong = edges_of(image, low_threshold=low, high_threshold=4 * weak - 1)
        assert (strong[y0 + 2 :, x0 - 2 : x0 + 2].sum(1) == 1).all()


def test_hysteresis_follows_a_long_weak_chain():
    # a weak step running the whole width, touched by a strong edge only at its far end: hysteresis must
    # propagate past many dilation steps (more than one convergence check)
    h, w, y0 = 12, 64, 6
    values = torch.zeros(h, w)
    values[y0:, :] = 40
    values[y0:, w - 3 :] = 255
    edges = edges_of(gray_image(values), low_threshold=100, high_threshold=200)
    assert edges[y0 - 1, : w - 4].all()


def test_batch_equals_per_frame_calls():
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(5, 3, 6, 8, generator=gen)
    frames = torch.nn.functional.interpolate(coarse, size=(30, 40), mode="bilinear", align_corners=False)
    frames = frames.permute(0, 2, 3, 1).contiguous()
    for channels in ("gray", "rgb"):
        batch = canny_edges(frames, 50, 120, channels=channels)
        assert batch.any()
        singles = torch.stack([canny_edges(frame, 50, 120, channels=channels) for frame in frames])
        assert torch.equal(batch, singles)
        assert torch.equal(canny_edges(frames[:1], 50, 120, channels=channels)[0], singles[0])


def test_output_format():
    image = gray_image(vertical_step(8, 8, 4, 0, 255))
    for frames in (image, image[None].expand(3, 8, 8, 3), image.double()):
        out = canny_edges(frames)
        assert out.shape == frames.shape and out.dtype == torch.float32 and out.device == frames.device
        assert set(out.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])
    assert torch.equal(canny_edges(image.double()), canny_edges(image))
    assert canny_edges(torch.zeros(0, 8, 8, 3)).shape == (0, 8, 8, 3)


def test_gray_is_cv2_luma():
    # cv2.cvtColor(RGB2GRAY) of pure red, green, blue, white: 76, 150, 29, 255
    rgb = torch.eye(3)[None, :, None, :].expand(1, 3, 1, 3)  # (f, h=3, w=1, 3)
    rgb = torch.cat([rgb, torch.ones(1, 1, 1, 3)], dim=1)
    assert intensity(rgb).flatten().tolist() == [76.0, 150.0, 29.0, 255.0]


def test_rgb_channels_see_chroma_edges_and_equal_gray_on_gray_frames():
    # red | green of (nearly) the same luma: 0.299·255 ≈ 0.587·130
    image = torch.zeros(8, 10, 3)
    image[:, :5, 0] = 1.0
    image[:, 5:, 1] = 130 / 255
    luma = intensity(image[None])[0, 0]
    assert (luma[:, :5] - luma[:, 5:].mean()).abs().max() <= 1  # a luma step of at most 1: m ≤ 4 < low
    assert not edges_of(image, channels="gray").any()
    expected = torch.zeros(8, 10, dtype=torch.bool)
    expected[:, 4] = True  # the red channel's step of 255, strongest there
    assert torch.equal(edges_of(image, channels="rgb"), expected)

    gen = torch.Generator().manual_seed(1)
    gray = torch.rand(2, 16, 16, 1, generator=gen).expand(2, 16, 16, 3)
    assert torch.equal(canny_edges(gray, 60, 150, channels="gray"), canny_edges(gray, 60, 150))  # default rgb
    assert torch.equal(edges_of(image), expected)  # the default is rgb, as cv2.Canny on T2V-Zero's colour frames


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(low_threshold=float("nan")), "low_threshold.*nan"),
        (dict(high_threshold=float("inf")), "high_threshold.*inf"),
        (dict(low_threshold=-1), "low_threshold.*-1"),
        (dict(low_threshold=150, high_threshold=120), r"low_threshold \(150.0\).*high_threshold \(120.0\)"),
        (dict(channels="bgr"), "'bgr'"),
    ],
)
def test_bad_thresholds_and_channels_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        canny_edges(torch.zeros(8, 8, 3), **kwargs)


@pytest.mark.parametrize(
    "frames, match",
    [
        (torch.zeros(8, 8), r"\(8, 8\)"),
        (torch.zeros(2, 8, 8, 4), r"\(2, 8, 8, 4\)"),
        (torch.zeros(1, 2, 8, 8, 3), r"\(1, 2, 8, 8, 3\)"),
        (torch.zeros(2, 3, 8, 8), r"\(2, 3, 8, 8\)"),
        (torch.zeros(0, 8, 3), r"\(0, 8, 3\)"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), "torch.uint8"),
        (torch.full((8, 8, 3), float("nan")), "NaN"),
    ],
)
def test_bad_frames_raise(frames, match):
    with pytest.raises(ValueError, match=match):
        canny_edges(frames)
